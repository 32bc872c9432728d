"""The `main` pipeline: its run tree, reuse, failure and resume, frozen params."""

from dataclasses import replace
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from conftest import ENTRY_POINT, FAST, fast_configs, mlflow_run, runs_by_stage
from skindiff.classify.train import ClassifierConfig
from skindiff.errors import SkindiffError
from skindiff.options import StudyConfigs
from skindiff.tracking.pipeline import run_main
from skindiff.tracking.report import run_report
from skindiff.tracking.settings import ReportConfig, StudyPlan

# A classifier that trains in a second: the pipeline's bookkeeping is under test.
FAST_CLASSIFIER = {"arch": "tiny", "epochs": 1, "batch_size": 16, "image_size": 32}
TRAINING_STAGES = ("prepare", "textual_inversion", "lora", "generate", "train_classifier")


def study_configs(**classifier: object) -> StudyConfigs:
    return StudyConfigs(*fast_configs(), ClassifierConfig(**FAST_CLASSIFIER | classifier))


def children(run_id: str) -> list:
    return mlflow.search_runs(
        filter_string=f"tags.mlflow.parentRunId = '{run_id}'", output_format="list"
    )


def test_mlflow_run_main_builds_the_run_tree_then_reuses_it(tracking: str, tmp_path: Path) -> None:
    params = FAST | {k: str(v) for k, v in FAST_CLASSIFIER.items() if k != "arch"}
    params |= {"scenarios": "i", "seeds": "0", "archs": "tiny", "train_types": "real,syn"}
    mlflow_run("main", tracking, tmp_path, **params)

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

    mlflow_run("main", tracking, tmp_path, **params)
    again = runs_by_stage(tracking)
    assert {s: len(again[s]) for s in TRAINING_STAGES} == {
        s: len(stages[s]) for s in TRAINING_STAGES
    }
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
