"""The `main` pipeline: its run tree, reuse, failure and resume, frozen params, shards."""

import logging
import re
from dataclasses import replace
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from conftest import ENTRY_POINT, FAST, fast_configs, mlflow_run, runs_by_stage
from skindiff.classify.train import ClassifierConfig
from skindiff.errors import SkindiffError
from skindiff.options import StudyConfigs
from skindiff.plans import ReportConfig, StudyPlan, slurm_array_shard
from skindiff.tracking.names import PARENT_RUN_TAG, RUN_KEY_TAG, SHARD_RESOLVED_PARAM
from skindiff.tracking.pipeline import run_main
from skindiff.tracking.report import run_report

# A classifier that trains in a second: the pipeline's bookkeeping is under test.
FAST_CLASSIFIER = {"arch": "tiny", "epochs": 1, "batch_size": 16, "image_size": 32}
TRAINING_STAGES = ("prepare", "textual_inversion", "lora", "generate", "train_classifier")
REUSED_STAGES = (*TRAINING_STAGES, "evaluate", "synthetic_quality")  # found too


def study_configs(**classifier: object) -> StudyConfigs:
    return StudyConfigs(*fast_configs(), ClassifierConfig(**FAST_CLASSIFIER | classifier))


def main_calls_by_shard(stages: dict[str, list]) -> dict[str, mlflow.entities.Run]:
    """The `main` calls (not their pair runs) of `runs_by_stage`, by the shard each resolved."""
    return {
        run.data.params[SHARD_RESOLVED_PARAM]: run
        for run in stages["main"]
        if PARENT_RUN_TAG not in run.data.tags
    }


def children(run_id: str) -> list:
    return mlflow.search_runs(
        filter_string=f"tags.mlflow.parentRunId = '{run_id}'", output_format="list"
    )


def test_mlflow_run_main_builds_the_run_tree_then_reuses_it(tracking: str, tmp_path: Path) -> None:
    params = FAST | {k: str(v) for k, v in FAST_CLASSIFIER.items() if k != "arch"}
    params |= {"scenarios": "i", "seeds": "0", "archs": "tiny", "train_types": "real,syn"}
    console = mlflow_run("main", tracking, tmp_path, **params)

    stages = runs_by_stage(tracking)
    (top,) = [r for r in stages["main"] if "mlflow.parentRunId" not in r.data.tags]
    (pair,) = [
        r for r in stages["main"] if r.data.tags.get("mlflow.parentRunId") == top.info.run_id
    ]
    assert pair.info.run_name == "i/seed-0" and pair.data.tags["skindiff.scenario"] == "i"
    assert pair.data.params == {"scenario": "i", "seed": "0"}
    tree = {(r.data.tags[ENTRY_POINT], r.info.run_name) for r in children(pair.info.run_id)}
    assert tree == {
        ("prepare", "i/seed-0/prepare"),
        ("textual_inversion", "i/seed-0/textual_inversion"),
        ("lora", "i/seed-0/lora"),
        ("generate", "i/seed-0/generate/img2img/ti+lora"),
        ("train_classifier", "i/seed-0/tiny/real"),
        ("train_classifier", "i/seed-0/tiny/syn"),
        ("evaluate", "i/seed-0/tiny/real/light"),
        ("evaluate", "i/seed-0/tiny/syn/light"),
        ("synthetic_quality", "i/seed-0/synthetic_quality"),
    }
    assert all(r.info.status == "FINISHED" for runs in stages.values() for r in runs)

    results_csv = mlflow.artifacts.download_artifacts(
        run_id=pair.info.run_id, artifact_path="results.csv", dst_path=str(tmp_path)
    )
    results = pd.read_csv(results_csv)
    by_type = {r.data.params["train_type"]: r for r in stages["train_classifier"]}
    assert sorted(results["train_type"]) == ["real", "syn"]
    for row in results.itertuples():
        assert row.run_id == by_type[row.train_type].info.run_id
        assert row.test_f1_macro == pytest.approx(
            by_type[row.train_type].data.metrics["test_f1_macro"]
        )
    syn = by_type["syn"].data.tags["skindiff.generate_run_id"]
    assert syn == stages["generate"][0].info.run_id

    # `report` reads the pipeline's results: one seed, so the mean is the run's own score.
    run_report(ReportConfig(tracking, str(tmp_path / "report")))
    table = pd.read_csv(tmp_path / "report" / "table2_scenario_i.csv").set_index("train_type")
    for train_type, run in by_type.items():
        expected = 100 * run.data.metrics["test_accuracy"]
        assert table.loc[train_type, "accuracy_mean"] == pytest.approx(expected)
    # ... and the skin tones the pipeline's prepare and generate runs measured.
    generate = stages["generate"][0].data.metrics
    (tones,) = pd.read_csv(tmp_path / "report" / "skin_tone.csv").itertuples()
    assert tones.on_target == pytest.approx(100 * generate["on_target_fraction"])
    assert tones.synthetic_ita == pytest.approx(generate["ita_median_synthetic"])
    prepare = stages["prepare"][0].data.metrics
    assert tones.real_dark_test_ita == pytest.approx(prepare["ita_median_test_dark"])
    assert (
        "Skin tone of the real and synthetic images"
        in (tmp_path / "report" / "report.md").read_text()
    )
    # ... and the synthetic images' quality, from the pair's synthetic_quality run.
    (quality_run,) = stages["synthetic_quality"]
    assert pair.data.tags["skindiff.synthetic_quality_run"] == quality_run.info.run_id
    quality = pd.read_csv(tmp_path / "report" / "synthetic_quality.csv").set_index("set")
    measured = quality_run.data.metrics
    assert quality.loc["synthetic", "fd"] == pytest.approx(measured["fd_classifier"])
    assert quality.loc["light_sources", "coverage"] == pytest.approx(
        measured["coverage_classifier_light_sources"]
    )
    assert quality.loc["synthetic", "memorized_share"] == pytest.approx(
        measured["memorized_share_pixels"]
    )
    report_text = (tmp_path / "report" / "report.md").read_text()
    assert "### Synthetic image quality" in report_text
    # ... and the near-duplicates its prepare run found: the demo's planted copies
    (copies,) = pd.read_csv(tmp_path / "report" / "near_duplicates.csv").itertuples()
    assert copies.near_duplicates == "report"
    assert copies.n_test_images_with_training_copy == prepare["n_test_images_with_training_copy"]
    assert copies.n_test_images_with_training_copy > 0 and copies.n_near_duplicates_dropped == 0
    assert "### Near-duplicates: test images with a copy in training" in report_text
    assert "![nearest training similarity](synthetic_quality_similarity.png)" in report_text

    # A person follows each stage on the console, without library notes they cannot act on.
    stage_lines = [
        "[i/seed-0] prepare",
        "[i/seed-0] textual_inversion",
        "[i/seed-0] lora",
        "[i/seed-0] generate img2img/ti+lora",
        "[i/seed-0] train_classifier tiny/real",
        "[i/seed-0] train_classifier tiny/syn",
        "[i/seed-0] evaluate tiny/syn/light",
        "[i/seed-0] synthetic_quality",
    ]
    for label in stage_lines:
        # started, done (synthetic_quality re-uses the real classifier, and says so)
        reused = console.count(f"{label}: re-used run")
        assert console.count(f"{label}: ") - reused == 2, (label, console[-3000:])
        assert re.search(
            rf"^{re.escape(label)}: done in [0-9]+ s, run [0-9a-f]{{32}}$", console, re.M
        )
    for noise in ("no lora keys associated", "pickle", "new embeddings", "traceback"):
        assert noise not in console.lower(), noise

    console = mlflow_run("main", tracking, tmp_path, **params)
    for label in stage_lines[::7]:  # the pair's first and last stage
        assert re.search(rf"^{re.escape(label)}: re-used run [0-9a-f]{{32}}$", console, re.M)
    assert ": done in " not in console
    again = runs_by_stage(tracking)
    assert {s: len(again[s]) for s in REUSED_STAGES} == {s: len(stages[s]) for s in REUSED_STAGES}
    assert len(again["main"]) == 2 * len(stages["main"])
    assert len(again["report"]) == 1


def test_failed_stage_stops_the_pipeline_and_the_next_call_resumes(
    tracking: str, tmp_path: Path
) -> None:
    broken = study_configs(weights=str(tmp_path / "missing.pt"))  # refused when it trains
    with pytest.raises(SkindiffError) as stopped:
        run_main(StudyPlan(["iii"], [1], ["tiny"], ["real"]), broken)
    message = str(stopped.value)
    (failed,) = runs_by_stage(tracking)["train_classifier"]
    assert failed.info.status == "FAILED"
    assert (
        f"iii/seed-1/tiny/real (run {failed.info.run_id}) failed: weights: checkpoint file"
        in message
    )
    assert "run the same command again" in message
    assert {r.info.status for r in runs_by_stage(tracking)["main"]} == {"FAILED"}

    done = run_main(StudyPlan(["iii"], [1], ["tiny"], ["real"]), study_configs())
    stages = runs_by_stage(tracking)
    assert len(stages["prepare"]) == 1  # the finished stage was re-used
    finished = [r for r in stages["train_classifier"] if r.info.status == "FINISHED"]
    assert [r.info.run_id for r in finished] == [done[("iii", 1)].classifiers[("tiny", "real")]]


def test_frozen_params_replace_the_options(tracking: str, tmp_path: Path) -> None:
    frozen = tmp_path / "frozen_params.yaml"
    frozen.write_text("lora_rank: '4'\nstrength: 0.3\nti_learning_rate: '0.002'\n")
    configs = study_configs()
    runs = run_main(StudyPlan(["ii"], [0], ["tiny"], ["syn"], str(frozen)), configs)
    ids = runs[("ii", 0)]
    assert mlflow.get_run(ids.lora).data.params["lora_rank"] == "4"
    assert mlflow.get_run(ids.generate).data.params["strength"] == "0.3"
    assert mlflow.get_run(ids.textual_inversion).data.params["ti_learning_rate"] == "0.002"
    assert configs.lora.rank != 4 and configs.generate.strength != 0.3
    (top,) = [r for r in runs_by_stage(tracking)["main"] if "mlflow.parentRunId" not in r.data.tags]
    assert top.data.params["frozen.lora_rank"] == "4"
    assert top.data.tags["skindiff.frozen_params"] == str(frozen)

    frozen.write_text("lora_rnak: '4'\n")
    with pytest.raises(SkindiffError, match=r"frozen_params.yaml: unknown option\(s\) lora_rnak"):
        run_main(StudyPlan(["ii"], [0], ["tiny"], ["syn"], str(frozen)), configs)
    with pytest.raises(SkindiffError, match="scenarios must be a comma list of i, ii, iii"):
        StudyPlan(["iv"], [0], ["tiny"], ["syn"])
    with pytest.raises(SkindiffError, match="train_types must be a comma list"):
        StudyPlan(["ii"], [0], ["tiny"], ["synthetic"])


def test_classifiers_that_cannot_train_stop_main_before_any_run(
    tracking: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch hub cache
    plan = StudyPlan(["i"], [0], ["vgg16", "resnet18"], ["real"])
    with pytest.raises(SkindiffError) as error:
        run_main(plan, study_configs())  # weights auto: ImageNet for both
    message = str(error.value)
    for name in ("vgg16-397923af.pth", "resnet18-f37072fd.pth", str(tmp_path / "hub")):
        assert name in message
    configs = study_configs(weights="none")
    configs = replace(configs, data=replace(configs.data, val_fraction=0))
    with pytest.raises(SkindiffError, match=r"val_fraction is 0\.0: .* or use --selection last"):
        run_main(plan, configs)
    assert not mlflow.search_runs([tracking], output_format="list")


def test_a_shard_is_k_of_n_and_every_pair_falls_in_exactly_one() -> None:
    for shard in ("0/3", "4/3", "x", "1/0", "", "1 / 3"):
        with pytest.raises(SkindiffError) as refused:
            StudyPlan(["i"], [0], ["tiny"], ["real"], shard=shard)
        assert str(refused.value) == f"shard must be auto or k/n with 1 <= k <= n, got {shard!r}"
    plan = StudyPlan(["i", "ii", "iii"], [0, 42], ["tiny"], ["real"])
    every = [(scenario, seed) for scenario in ("i", "ii", "iii") for seed in (0, 42)]
    assert plan.pairs() == every
    assert replace(plan, shard="2/4").pairs() == [("i", 42), ("iii", 42)]
    for n in range(1, 5):
        shards = [replace(plan, shard=f"{k}/{n}").pairs() for k in range(1, n + 1)]
        assert sorted(pair for shard in shards for pair in shard) == sorted(every)
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


def slurm_array(first: int, count: int, task: int, step: int = 1) -> dict[str, str]:
    """The variables sbatch --array=<first>-<first+count-1> sets in task `task`."""
    last = first + (count - 1) * step
    values = {"ID": task, "COUNT": count, "MIN": first, "MAX": last, "STEP": step}
    return {f"SLURM_ARRAY_TASK_{name}": str(value) for name, value in values.items()}


def test_shard_auto_is_the_slurm_array_tasks_share_and_every_pair_outside_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plan = StudyPlan(["i", "ii", "iii"], [0, 42, 123, 1111, 1234], ["tiny"], ["real"])
    assert plan.shard == "auto"
    assert plan.resolved_shard() == "1/1" and len(plan.pairs()) == 15
    assert slurm_array_shard({"SLURM_ARRAY_TASK_ID": ""}) == (1, 1)  # empty: unset
    # --array=0-14 (the docs' script) and --array=1-15: task k of 15 either way.
    for first in (0, 1):
        ran = []
        for task in range(first, first + 15):
            for name, value in slurm_array(first, 15, task).items():
                monkeypatch.setenv(name, value)
            worker = replace(plan)  # built, so checked, under the task's variables
            assert worker.resolved_shard() == f"{task - first + 1}/15"
            assert worker.pairs() == replace(plan, shard=f"{task - first + 1}/15").pairs()
            ran += worker.pairs()
        assert sorted(ran) == sorted(replace(plan, shard="1/1").pairs())
    # Without MAX and STEP (older SLURM), ID, COUNT and MIN suffice.
    assert slurm_array_shard({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "3",
                              "SLURM_ARRAY_TASK_MIN": "5"}) == (3, 3)  # fmt: skip


@pytest.mark.parametrize(
    ("environ", "problem"),
    [
        (
            {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "15"},
            " without SLURM_ARRAY_TASK_MIN; give --shard k/n",
        ),
        (
            slurm_array(0, 15, 3) | {"SLURM_ARRAY_TASK_ID": "3a"},
            ": SLURM_ARRAY_TASK_ID must be an integer, got '3a'",
        ),
        (
            slurm_array(0, 15, 3) | {"SLURM_ARRAY_TASK_COUNT": "-15"},
            ": SLURM_ARRAY_TASK_COUNT must be an integer, got '-15'",
        ),
        (
            slurm_array(0, 8, 2, step=2),  # --array=0-14:2
            ": the array's task ids are not contiguous (a step or a list such as "
            "--array=0-14:2); give a range such as --array=0-14, or --shard k/n",
        ),
        (
            slurm_array(1, 3, 4) | {"SLURM_ARRAY_TASK_MAX": "5"},  # --array=1,4,5
            ": the array's task ids are not contiguous (a step or a list such as "
            "--array=0-14:2); give a range such as --array=0-14, or --shard k/n",
        ),
        (
            slurm_array(0, 15, 15),
            ": SLURM_ARRAY_TASK_ID is not within SLURM_ARRAY_TASK_MIN .. "
            "SLURM_ARRAY_TASK_MIN + SLURM_ARRAY_TASK_COUNT - 1",
        ),
        (
            slurm_array(0, 1, 0) | {"SLURM_ARRAY_TASK_COUNT": "0"},
            ": SLURM_ARRAY_TASK_COUNT must be at least 1",
        ),
    ],
)
def test_shard_auto_refuses_unusable_slurm_variables_naming_them(
    environ: dict[str, str], problem: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    given = " ".join(f"{name}={value}" for name, value in environ.items())
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SkindiffError) as refused:
        StudyPlan(["i"], [0], ["tiny"], ["real"])
    assert str(refused.value) == f"shard auto: {given}{problem}"
    assert StudyPlan(["i"], [0], ["tiny"], ["real"], shard="1/2").pairs() == [("i", 0)]


def test_shards_run_their_own_pairs_and_report_them_together(
    tracking: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def plan(shard: str) -> StudyPlan:
        return StudyPlan(["i"], [0, 1], ["tiny"], ["real"], shard=shard)

    shards = {"1/2": run_main(plan("1/2"), study_configs())}
    # The other worker is the second task of a SLURM array (--array=0-1): auto makes it 2/2.
    with monkeypatch.context() as slurm_task:
        for name, value in slurm_array(0, 2, 1).items():
            slurm_task.setenv(name, value)
        shards["2/2"] = run_main(plan("auto"), study_configs())
    assert {shard: list(done) for shard, done in shards.items()} == {
        "1/2": [("i", 0)],
        "2/2": [("i", 1)],
    }
    stages = runs_by_stage(tracking)
    calls = main_calls_by_shard(stages)
    assert {shard: run.data.params["shard"] for shard, run in calls.items()} == {
        "1/2": "1/2",
        "2/2": "auto",
    }
    for shard, seed in (("1/2", 0), ("2/2", 1)):
        (pair,) = children(calls[shard].info.run_id)
        assert pair.info.run_name == f"i/seed-{seed}"
        ran = sorted(r.info.run_name for r in children(pair.info.run_id))
        assert ran == [
            f"i/seed-{seed}/prepare",
            f"i/seed-{seed}/tiny/real",
            f"i/seed-{seed}/tiny/real/light",
        ]

    # One group of settings, whichever worker ran a pair: the mean is over both seeds.
    run_report(ReportConfig(tracking, str(tmp_path / "report")))
    table = pd.read_csv(tmp_path / "report" / "table2_scenario_i.csv")
    (row,) = table[(table["arch"] == "tiny") & (table["train_type"] == "real")].itertuples()
    accuracies = [
        mlflow.get_run(runs.classifiers[("tiny", "real")]).data.metrics["test_accuracy"]
        for done in shards.values()
        for runs in done.values()
    ]
    assert row.n_seeds == 2
    assert row.accuracy_mean == pytest.approx(100 * sum(accuracies) / 2)

    # An unsharded call finds every stage the shards ran: the same runs, none made twice.
    whole = run_main(plan("1/1"), study_configs())
    sharded = {pair: runs for done in shards.values() for pair, runs in done.items()}
    assert {pair: (r.prepare, r.classifiers) for pair, r in whole.items()} == {
        pair: (r.prepare, r.classifiers) for pair, r in sharded.items()
    }
    again = runs_by_stage(tracking)
    stage_runs = again["prepare"] + again["train_classifier"]
    assert len(stage_runs) == 4
    assert len({r.data.tags[RUN_KEY_TAG] for r in stage_runs}) == 4

    with caplog.at_level(logging.WARNING, logger="skindiff"):
        assert run_main(plan("3/3"), study_configs()) == {}
    assert "shard 3/3 has none of the 2 pairs: nothing to run" in caplog.text
    assert len(runs_by_stage(tracking)["main"]) == len(again["main"])


def test_frozen_params_of_no_known_tune_seed_are_said_to_be_unknown(
    tracking: str, tmp_path: Path
) -> None:
    """A YAML file of frozen params names no tune run: every seed uses it (a fallback seed is
    of no use), its pairs record the tune seed as unknown and count no test images, and the
    report says how many scored the tuning objective is unknown."""
    frozen = tmp_path / "frozen_params.yaml"
    frozen.write_text("lora_rank: '4'\n")
    plan = StudyPlan(["ii"], [0, 1], ["tiny"], ["real"], str(frozen), frozen_fallback_seed=7)
    runs = run_main(plan, study_configs())
    for seed in (0, 1):
        pair = mlflow.get_run(runs[("ii", seed)].parent).data
        assert pair.params == {
            "scenario": "ii",
            "seed": str(seed),
            "frozen.lora_rank": "4",
            "frozen_params_seed": "unknown",
        }
        assert "n_test_images_scored_by_tuning" not in pair.metrics
    (top,) = [r for r in runs_by_stage(tracking)["main"] if PARENT_RUN_TAG not in r.data.tags]
    assert top.data.params["frozen_params_seed"] == "unknown"
    assert "tuning_overlap.csv" not in {
        a.path for a in mlflow.MlflowClient().list_artifacts(top.info.run_id)
    }
    run_report(ReportConfig(tracking, str(tmp_path / "report")))
    report = (tmp_path / "report" / "report.md").read_text()
    assert f"Tuned settings frozen from `{frozen}` (tune protocol: unknown)" in report
    assert (
        "how many of each scenario's test images scored the tuning objective is unknown" in report
    )


def test_two_seeds_of_main_report_paired_differences_and_light_gaps(
    tracking: str, tmp_path: Path
) -> None:
    """Two seeds of `main` on the demo: the report's paired differences are the means over
    seeds of the classifier runs' logged metric differences, within their intervals; the
    light-minus-dark gaps are those of the classifiers' logged light and test macro F1."""
    plan = StudyPlan(["i"], [0, 1], ["tiny"], ["real", "syn", "real+syn"])
    done = run_main(plan, study_configs())
    metrics = {}
    for (_, seed), runs in done.items():
        assert set(runs.light_evaluations) == set(runs.classifiers)
        for (_, train_type), run_id in runs.classifiers.items():
            light = mlflow.get_run(runs.light_evaluations[("tiny", train_type)])
            assert light.data.tags[PARENT_RUN_TAG] == runs.parent
            metrics[(seed, train_type)] = mlflow.get_run(run_id).data.metrics | light.data.metrics
        results = pd.read_csv(
            mlflow.artifacts.download_artifacts(f"runs:/{runs.parent}/results.csv")
        )
        assert list(results["light_run_id"]) == list(runs.light_evaluations.values())

    out = tmp_path / "report"
    run_report(ReportConfig(tracking, str(out)))
    paired = pd.read_csv(out / "paired_differences.csv")
    assert len(paired) == 4  # (real+syn, syn) vs real x (accuracy, macro F1)
    for row in paired.itertuples():
        candidate, baseline = row.comparison.split(" vs ")
        name = f"test_{row.metric}"
        differences = [
            100 * (metrics[(s, candidate)][name] - metrics[(s, baseline)][name]) for s in (0, 1)
        ]
        assert row.n_seeds == 2
        assert row.mean_diff == pytest.approx(sum(differences) / 2, abs=1e-6)
        assert row.ci_low <= row.mean_diff <= row.ci_high
        assert 0 <= row.p_value <= row.p_holm <= 1

    gaps = pd.read_csv(out / "fairness_gap.csv")
    assert sorted(gaps["comparison"]) == ["real+syn vs real", "syn vs real"]
    for row in gaps.itertuples():
        expected = {}
        for role, train_type in zip(
            ("candidate", "baseline"), row.comparison.split(" vs "), strict=True
        ):
            per_seed = [
                100
                * (
                    metrics[(s, train_type)]["light_f1_macro"]
                    - metrics[(s, train_type)]["test_f1_macro"]
                )
                for s in (0, 1)
            ]
            expected[role] = sum(per_seed) / 2
        assert row.baseline_gap == pytest.approx(expected["baseline"], abs=1e-6)
        assert row.candidate_gap == pytest.approx(expected["candidate"], abs=1e-6)
        narrowing = abs(expected["baseline"]) - abs(expected["candidate"])
        assert row.narrowing == pytest.approx(narrowing, abs=1e-6)
        assert row.baseline_ci_low <= row.baseline_ci_high
        assert row.narrowing_ci_low <= row.narrowing_ci_high
        assert (row.n_light_images, row.n_dark_images) == (16, 16)
    assert "### Light-minus-dark gap" in (out / "report.md").read_text()

    # Without light_test, a pair scores its classifiers on the dark test split only.
    dark_only = StudyPlan(["i"], [0], ["tiny"], ["real"], light_test=False)
    assert run_main(dark_only, study_configs())[("i", 0)].light_evaluations == {}
