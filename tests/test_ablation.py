"""The ablation (Table 5 protocol) on a tiny setting against the real tracking server."""

from dataclasses import replace
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, f1_score

from conftest import CONDITIONS, fast_configs, runs_by_stage
from skindiff.classify.train import ClassifierConfig, predict
from skindiff.diffusion.config import GenerationMode
from skindiff.errors import SkindiffError
from skindiff.options import StudyConfigs
from skindiff.plans import AblationPlan, ReportConfig
from skindiff.tracking.ablation import mode_metric_name, plan_ablation, run_ablation
from skindiff.tracking.classifier_model import load_classifier
from skindiff.tracking.report import run_report
from skindiff.tracking.runs import load_split

STAGES = ("prepare", "textual_inversion", "lora", "generate", "train_classifier", "evaluate")


def test_ablation_runs_all_modes_on_both_subsets_and_reuses_runs(
    tracking: str, tmp_path: Path
) -> None:
    data, ti, lora, generate = fast_configs()
    generate = replace(generate, num_per_image=1)
    classifier = ClassifierConfig(arch="tiny", epochs=1, batch_size=16, image_size=32)
    configs = StudyConfigs(data, ti, lora, generate, classifier)
    before = plan_ablation(AblationPlan(seeds=(0,)), configs)
    run_id = run_ablation(AblationPlan(seeds=(0,)), configs)
    # the dry run planned every stage run the ablation made, then plans to re-use them all
    made = runs_by_stage(tracking)
    made.pop("ablation")
    assert sorted((s.stage, s.run_name) for s in before.stages) == sorted(
        (stage, run.info.run_name) for stage, runs in made.items() for run in runs
    )
    after = plan_ablation(AblationPlan(seeds=(0,)), configs)
    assert {s.reused for s in after.stages} == {
        run.info.run_id for runs in made.values() for run in runs
    }

    path = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="ablation.csv", dst_path=str(tmp_path)
    )
    table = pd.read_csv(path)
    assert sorted(zip(table["mode"], table["test_set"], strict=True)) == sorted(
        (mode, test_set) for mode in GenerationMode for test_set in ("light", "dark")
    )
    stages = runs_by_stage(tracking)
    classifiers = {run.info.run_id: run for run in stages["train_classifier"]}
    assert len(classifiers) == len(GenerationMode)
    assert {run.data.params["mode"] for run in classifiers.values()} == set(GenerationMode)
    assert {run.data.params["train_type"] for run in classifiers.values()} == {"syn"}
    (prepare,) = stages["prepare"]
    light_rows = load_split(prepare.info.run_id, "flexible_light")
    ablation_metrics = mlflow.get_run(run_id).data.metrics
    for row in table.itertuples():
        run = classifiers[row.classifier_run_id]
        assert run.data.params["mode"] == row.mode
        if row.test_set == "dark":
            assert row.accuracy == pytest.approx(run.data.metrics["test_accuracy"])
            assert row.f1_macro == pytest.approx(run.data.metrics["test_f1_macro"])
        else:
            model = load_classifier(f"runs:/{row.classifier_run_id}/model")
            predicted = predict(model, light_rows, CONDITIONS, 32, 64)
            truth, guess = predicted["label"], predicted["predicted"]
            assert row.accuracy == pytest.approx(accuracy_score(truth, guess))
            assert row.f1_macro == pytest.approx(
                f1_score(truth, guess, average="macro", labels=list(CONDITIONS), zero_division=0)
            )
            (evaluation,) = [
                run
                for run in stages["evaluate"]
                if run.data.params["model_uri"] == f"runs:/{row.classifier_run_id}/model"
            ]
            logged = pd.read_csv(
                mlflow.artifacts.download_artifacts(
                    run_id=evaluation.info.run_id,
                    artifact_path="predictions/light.csv",
                    dst_path=str(tmp_path / evaluation.info.run_id),
                )
            )
            assert list(logged["md5hash"]) == list(light_rows["md5hash"])
            assert list(logged["predicted"]) == list(guess)
        name = mode_metric_name(row.test_set, "accuracy", row.mode)
        assert "+" not in name and ablation_metrics[name] == pytest.approx(row.accuracy)

    # The report's light-minus-dark gaps are those of ablation.csv, each mode against ti+lora.
    run_report(ReportConfig(tracking, str(tmp_path / "report"), bootstrap_replicates=200))
    gaps = pd.read_csv(tmp_path / "report" / "fairness_gap.csv").set_index("comparison")
    f1 = table.pivot_table(index="mode", columns="test_set", values="f1_macro")
    gap = 100 * (f1["light"] - f1["dark"])
    baseline = "img2img/ti+lora"
    modes = [mode for mode in GenerationMode if mode != baseline]
    assert sorted(gaps.index) == sorted(f"{mode} vs {baseline}" for mode in modes)
    for mode in modes:
        row = gaps.loc[f"{mode} vs {baseline}"]
        assert row["candidate_gap"] == pytest.approx(gap[mode], abs=1e-6)
        assert row["baseline_gap"] == pytest.approx(gap[baseline], abs=1e-6)
        assert row["n_seeds"] == 1 and row["n_light_images"] == 8 * len(CONDITIONS)

    counts = {stage: len(stages[stage]) for stage in STAGES}
    second = run_ablation(AblationPlan(seeds=(0,)), configs)
    again = runs_by_stage(tracking)
    assert {stage: len(again[stage]) for stage in STAGES} == counts
    assert len(again["ablation"]) == 2 and mlflow.get_run(second).info.status == "FINISHED"


def test_missing_imagenet_weights_stop_the_ablation_before_any_run(
    tracking: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch hub cache
    classifier = ClassifierConfig(arch="vgg16", epochs=1, batch_size=16, image_size=32)
    configs = StudyConfigs(*fast_configs(), classifier)
    with pytest.raises(SkindiffError, match=r"vgg16-397923af\.pth \(vgg16\)"):
        run_ablation(AblationPlan(seeds=(0,)), configs)
    assert not mlflow.search_runs([tracking], output_format="list")
