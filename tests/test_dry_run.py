"""Dry runs: `main --dry-run` plans what a real call then runs, and re-uses what it finished;
its costs are those of the runs it plans."""

import mlflow
import pytest

from skindiff.cli import run
from skindiff.plans import StudyPlan, TuneConfig
from skindiff.search_space import BUILTIN_SPACE
from skindiff.tracking.dry_run import DryRun, WorkCost
from skindiff.tracking.names import ENTRY_POINT_TAG, RUN_KEY_TAG, Stage
from skindiff.tracking.pipeline import plan_main, run_main
from skindiff.tracking.tune import plan_tune
from test_pipeline import study_configs


def stage_runs(experiment_id: str) -> dict[str, mlflow.entities.Run]:
    """The experiment's stage runs (not the main and pair runs above them), by name."""
    runs = mlflow.search_runs([experiment_id], output_format="list")
    return {r.info.run_name: r for r in runs if r.data.tags[ENTRY_POINT_TAG] != Stage.MAIN}


def planned(plan: DryRun) -> list[tuple[str, str]]:
    return [(s.stage, s.run_name) for s in plan.stages]


def test_the_plan_is_what_main_runs_then_what_it_reuses(tracking: str) -> None:
    plan = StudyPlan(["i"], [0], ["tiny"], ["real", "syn"])
    configs = study_configs()
    before = plan_main(plan, configs)
    assert all(s.reused is None for s in before.stages)
    assert stage_runs(tracking) == {}, "a dry run logs nothing"

    (runs,) = run_main(plan, configs).values()
    made = stage_runs(tracking)
    # the same stages, each with the key its real run has (evaluations have none beforehand)
    assert sorted(planned(before)) == sorted(
        (r.data.tags[ENTRY_POINT_TAG], name) for name, r in made.items()
    )
    for stage in before.stages:
        if stage.stage != Stage.EVALUATE:
            assert made[stage.run_name].data.tags[RUN_KEY_TAG] == stage.key, stage.run_name
    # the costs are what the runs did
    costs = {s.run_name: s.cost for s in before.stages}
    generate = made["i/seed-0/generate/img2img/ti+lora"].data.metrics
    assert costs["i/seed-0/generate/img2img/ti+lora"].images == generate["n_synthetic"]
    for train_type in ("real", "syn"):
        trained = made[f"i/seed-0/tiny/{train_type}"].data.metrics
        images = trained["n_train_real"] + trained["n_train_synthetic"]
        cost = costs[f"i/seed-0/tiny/{train_type}"]
        assert cost.image_epochs == images * configs.classifier.epochs
    lora = costs["i/seed-0/lora"]
    assert lora.steps == configs.lora.max_train_steps
    assert lora.flops > 0 and before.total().flops > lora.flops

    after = plan_main(plan, configs)
    assert planned(after) == planned(before)
    assert {s.run_name: s.reused for s in after.stages} == {
        name: r.info.run_id for name, r in made.items()
    }
    assert after.total() == WorkCost() and after.counts() == (0, len(made))
    assert runs.classifiers[("tiny", "real")] == made["i/seed-0/tiny/real"].info.run_id


def test_main_dry_run_prints_the_plan_and_its_totals(
    tracking: str, capsys: pytest.CaptureFixture
) -> None:
    options = ["--scenarios", "i", "--seeds", "0", "--archs", "tiny", "--train-types", "real"]
    options += ["--light-test", "false", "--epochs", "3", "--throughput-tflops", "0.001"]
    with pytest.raises(SystemExit) as done:
        run(["main", "--dry-run", *options])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "Dry run: nothing was run or logged." in out
    plans = {
        line.split()[1]: line.split()[2] for line in out.splitlines() if line.startswith("i/seed-0")
    }
    assert plans == {"prepare": "run", "tiny/real": "run"}
    assert "stage runs: 2 to run, 0 re-used" in out
    assert "0 UNet evaluations" in out and "projected: 0.0 h of UNet work at 0.001" in out
    assert stage_runs(tracking) == {}


def test_tune_plans_its_trials_at_the_search_space_high_ends(tracking: str) -> None:
    dry = plan_tune(study_configs(), TuneConfig(n_trials=3))
    trial = {s.stage: s for s in dry.stages if s.group == "skindiff-tune/trial"}
    assert set(trial) == {"textual_inversion", "lora", "generate", "train_classifier"}
    assert all(s.repeats == 3 and s.reused is None for s in trial.values())
    high = {name: spec.get("high") for name, spec in BUILTIN_SPACE.items()}
    assert trial["textual_inversion"].cost.steps == high["ti_max_train_steps"]
    assert trial["lora"].cost.steps == high["lora_max_train_steps"]
    generate = trial["generate"].cost
    per_image = int(high["num_inference_steps"] * high["strength"]) * 2  # guidance: 2 passes
    assert generate.unet_evaluations == generate.images * per_image
    steps = high["ti_max_train_steps"] + high["lora_max_train_steps"]
    assert dry.total().steps == 3 * steps
    assert dry.counts() == (1 + 3 * 4, 0)  # prepare once, four stages per trial
