"""train_classifier and evaluate as MLflow runs, through `mlflow run` on a real server."""

from dataclasses import replace
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from conftest import CONDITIONS, fast_configs, mlflow_run, runs_by_stage
from skindiff.classify.config import ClassifierConfig
from skindiff.classify.models import build_classifier
from skindiff.classify.train import ClassifierResult, placed_with_optimizer
from skindiff.data.config import PrepareConfig
from skindiff.errors import SkindiffError
from skindiff.plans import EvaluateConfig
from skindiff.tracking.classifier_model import load_classifier
from skindiff.tracking.evaluate import run_evaluate
from skindiff.tracking.generate import run_generate
from skindiff.tracking.prepare import run_prepare
from skindiff.tracking.train_classifier import (
    check_classifiers,
    log_classifier,
    run_train_classifier,
)

CLASSIFIER = {
    "conditions": ",".join(CONDITIONS),
    "arch": "tiny",
    "epochs": "3",
    "batch_size": "32",
    "image_size": "64",
}


@pytest.fixture()
def upstream(tracking: str) -> dict[str, str]:
    """A prepare and a (small) generate run of the two-condition demo setting."""
    data, ti, lora, generate = fast_configs()
    prepare = run_prepare(data)
    return {
        "prepare_run_id": prepare,
        "generate_run_id": run_generate(data, ti, lora, generate, prepare_run_id=prepare),
    }


def logged_predictions(run_id: str, tmp_path: Path) -> pd.DataFrame:
    path = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="predictions/test.csv", dst_path=str(tmp_path / run_id)
    )
    return pd.read_csv(path)


@pytest.mark.parametrize("train_type", ["real", "syn", "real+syn"])
def test_train_types_end_to_end(
    tracking: str, upstream: dict[str, str], tmp_path: Path, train_type: str
) -> None:
    mlflow_run(
        "train_classifier", tracking, tmp_path, train_type=train_type, **CLASSIFIER, **upstream
    )
    (run,) = runs_by_stage(tracking)["train_classifier"]
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    synthetic = metrics["n_train_synthetic"]
    real = metrics["n_train_real"]
    assert (real > 0) == (train_type != "syn") and (synthetic > 0) == (train_type != "real")
    if train_type != "real":
        assert run.data.tags["skindiff.generate_run_id"] == upstream["generate_run_id"]

    predictions = logged_predictions(run.info.run_id, tmp_path)
    assert list(predictions.columns) == [
        "md5hash",
        "label",
        "predicted",
        "fitzpatrick_scale",
        "group",
    ]
    y, p = predictions["label"], predictions["predicted"]
    macro = {"average": "macro", "zero_division": 0, "labels": list(CONDITIONS)}
    assert metrics["test_accuracy"] == pytest.approx(accuracy_score(y, p))
    assert metrics["test_precision_macro"] == pytest.approx(precision_score(y, p, **macro))
    assert metrics["test_recall_macro"] == pytest.approx(recall_score(y, p, **macro))
    assert metrics["test_f1_macro"] == pytest.approx(f1_score(y, p, **macro))
    dark = predictions[predictions["group"] == "dark"]
    assert metrics["test_accuracy_dark"] == pytest.approx(
        accuracy_score(dark["label"], dark["predicted"])
    )
    assert 1 <= metrics["best_epoch"] <= 3
    assert run.data.tags["skindiff.kept_epoch"] == str(int(metrics["best_epoch"]))
    info = mlflow.models.get_model_info(f"runs:/{run.info.run_id}/model")
    assert info.signature is not None and info.metadata["labels"] == list(CONDITIONS)

    # The logged model, evaluated again on the same test manifest, scores the same.
    evaluate_id = run_evaluate(
        EvaluateConfig(
            model_uri=f"runs:/{run.info.run_id}/model",
            manifest=f"runs:/{upstream['prepare_run_id']}/splits/test.csv",
        )
    )
    again = mlflow.get_run(evaluate_id).data.metrics
    assert again["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert again["test_f1_macro"] == pytest.approx(metrics["test_f1_macro"])
    assert mlflow.get_run(evaluate_id).data.tags["mlflow.project.entryPoint"] == "evaluate"


def test_evaluate_on_an_external_metadata_csv(
    tracking: str, upstream: dict[str, str], demo_dataset, tmp_path: Path
) -> None:
    mlflow_run(
        "train_classifier",
        tracking,
        tmp_path,
        **CLASSIFIER,
        prepare_run_id=upstream["prepare_run_id"],
    )
    (trained,) = runs_by_stage(tracking)["train_classifier"]
    evaluate_id = run_evaluate(
        EvaluateConfig(
            model_uri=f"runs:/{trained.info.run_id}/model",
            metadata_csv=str(demo_dataset.metadata_csv),
            image_dir=str(demo_dataset.image_dir),
            name="external",
        )
    )
    run = mlflow.get_run(evaluate_id)
    predictions = pd.read_csv(
        mlflow.artifacts.download_artifacts(
            run_id=evaluate_id,
            artifact_path="predictions/external.csv",
            dst_path=str(tmp_path / "e"),
        )
    )
    # The whole cohort of the model's two conditions (FST 1, 2, 5, 6) of the demo data.
    rows = pd.read_csv(demo_dataset.metadata_csv)
    cohort = rows[rows.label.isin(CONDITIONS) & rows.fitzpatrick_scale.isin([1, 2, 5, 6])]
    assert len(predictions) == len(cohort) > 2 * (8 + 12 + 8 + 6)  # the planted copies too
    assert set(predictions["label"]) == set(CONDITIONS)
    assert run.data.metrics["external_accuracy"] == pytest.approx(
        accuracy_score(predictions["label"], predictions["predicted"])
    )


def test_evaluate_refuses_what_is_not_a_classifier(tracking: str) -> None:
    # A real MLflow PyTorch model, but without the labels a skindiff classifier carries.
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(
            torch.nn.Linear(2, 2),
            name="model",
            serialization_format="pickle",
            pip_requirements=["torch"],
        )
    with pytest.raises(SkindiffError, match=r"is not a skindiff classifier \(no labels\)"):
        run_evaluate(EvaluateConfig(model_uri=info.model_uri, manifest="x.csv"))
    assert [r.info.status for r in runs_by_stage(tracking)["evaluate"]] == ["FAILED"]
    with pytest.raises(SkindiffError, match="model_uri 'runs:/0123456789abcdef/model'"):
        run_evaluate(EvaluateConfig(model_uri="runs:/0123456789abcdef/model", manifest="x.csv"))
    with pytest.raises(SkindiffError, match="either manifest, or metadata_csv"):
        EvaluateConfig(model_uri="runs:/x/model")
    with pytest.raises(SkindiffError, match="model_uri is empty"):
        EvaluateConfig(manifest="x.csv")


@pytest.mark.parametrize("arch", ["tiny", "vit_b_16"])
def test_a_classifier_is_logged_and_loaded_without_pickle(
    tracking: str, library_log: pytest.LogCaptureFixture, recwarn, tmp_path: Path, arch: str
) -> None:
    """Weights as safetensors and the code that rebuilds them: nothing pickled, no word about
    pickle, and the model loads, for `evaluate` and through mlflow.pyfunc, with the trained
    model's logits bit for bit."""
    size = 224 if arch == "vit_b_16" else 32
    torch.manual_seed(0)
    model = build_classifier(arch, len(CONDITIONS), "none", "full")
    placed_with_optimizer(model, torch.device("cpu"), 1e-3)  # the layout training leaves
    model(torch.randn(4, 3, size, size))  # batch norm statistics that are not the initial ones
    model.eval()
    result = ClassifierResult(model, CONDITIONS, pd.DataFrame(), 1, None, pd.DataFrame())
    with mlflow.start_run() as run:
        log_classifier(result, ClassifierConfig(arch=arch, weights="none", image_size=size))
    uri = f"runs:/{run.info.run_id}/model"
    images = torch.randn(3, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = model(images)
        assert torch.equal(load_classifier(uri)(images), expected)
    assert np.array_equal(mlflow.pyfunc.load_model(uri).predict(images.numpy()), expected.numpy())

    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path)))
    files = {str(path.relative_to(local)) for path in local.rglob("*") if path.is_file()}
    assert {"artifacts/model.safetensors", "classifier_code.py"} <= files
    assert not [name for name in files if name.endswith((".pkl", ".pt", ".pth"))]
    said = [r.getMessage() for r in library_log.records] + [str(w.message) for w in recwarn]
    assert not [text for text in said if "pickle" in text.lower()]
    assert not [r.getMessage() for r in library_log.records if r.name.startswith("mlflow")]

    # A classifier logged by an earlier skindiff: a pickled mlflow.pytorch model.
    with mlflow.start_run() as run:
        mlflow.pytorch.log_model(
            model, name="model", serialization_format="pickle", pip_requirements=["torch"]
        )
    with torch.inference_mode():
        assert torch.equal(load_classifier(f"runs:/{run.info.run_id}/model")(images), expected)


def test_classifier_settings_are_checked_before_anything_runs(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch hub cache
    data, archs = PrepareConfig(), ["vgg16", "resnet18", "tiny"]
    with pytest.raises(SkindiffError) as error:
        check_classifiers(data, ClassifierConfig(), archs)
    assert "vgg16-397923af.pth (vgg16), resnet18-f37072fd.pth (resnet18)." in str(error.value)
    check_classifiers(data, ClassifierConfig(weights="none"), archs)
    with pytest.raises(SkindiffError, match="image_size must be 224 for arch vit_b_16"):
        check_classifiers(data, ClassifierConfig(weights="none", image_size=64), ["vit_b_16"])

    no_val = PrepareConfig(val_fraction=0)
    ways_out = r"val_fraction is 0.0: .*--val-fraction > 0, or use --selection last \(or test\)$"
    with pytest.raises(SkindiffError, match=ways_out):
        check_classifiers(no_val, ClassifierConfig(), ["tiny"])
    for selection in ("last", "test"):
        check_classifiers(no_val, ClassifierConfig(selection=selection), ["tiny"])


@pytest.mark.parametrize("selection", ["last", "test"])
def test_selection_without_a_validation_split(tracking: str, selection: str) -> None:
    data, ti, lora, generate = fast_configs()
    data = replace(data, val_fraction=0)
    config = ClassifierConfig(
        arch="tiny", epochs=3, batch_size=32, image_size=32, selection=selection
    )
    with pytest.raises(SkindiffError, match=r"but val_fraction is 0\.0"):
        run_train_classifier(data, replace(config, selection="val"), ti, lora, generate)
    assert not mlflow.search_runs([tracking], output_format="list")  # refused before any run

    run = mlflow.get_run(run_train_classifier(data, config, ti, lora, generate))
    assert run.info.status == "FINISHED"
    assert run.data.tags["skindiff.selection"] == selection
    metrics = run.data.metrics
    assert not [name for name in metrics if "val_" in name]
    artifacts = mlflow.artifacts.list_artifacts(run_id=run.info.run_id, artifact_path="predictions")
    assert [Path(a.path).name for a in artifacts] == ["test.csv"]
    client = mlflow.MlflowClient()
    losses = client.get_metric_history(run.info.run_id, "epoch_train_loss")
    assert sorted(m.step for m in losses) == [1, 2, 3]
    if selection == "last":
        assert metrics["best_epoch"] == 3 and run.data.tags["skindiff.kept_epoch"] == "3"
    else:
        # The reference rule keeps no epoch of 3: the initial weights, scored every epoch.
        assert metrics["best_epoch"] == 0 and run.data.tags["skindiff.kept_epoch"] == "initial"
        curve = client.get_metric_history(run.info.run_id, "epoch_test_loss")
        assert sorted(m.step for m in curve) == [1, 2, 3]


def test_a_timm_classifier_is_logged_and_evaluated(tracking: str) -> None:
    """`arch timm:<name>` through the stage: its name in the run name and params, the logged
    model rebuilt by `evaluate` with the same scores."""
    data, ti, lora, generate = fast_configs()
    prepare = run_prepare(data)
    config = ClassifierConfig(
        arch="timm:test_resnet", weights="none", epochs=1, batch_size=32, image_size=32
    )
    run = mlflow.get_run(
        run_train_classifier(data, config, ti, lora, generate, prepare_run_id=prepare)
    )
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "i/seed-0/timm:test_resnet/real"
    assert run.data.params["arch"] == "timm:test_resnet"
    evaluate_id = run_evaluate(
        EvaluateConfig(
            model_uri=f"runs:/{run.info.run_id}/model",
            manifest=f"runs:/{prepare}/splits/test.csv",
        )
    )
    again = mlflow.get_run(evaluate_id).data.metrics
    assert again["test_accuracy"] == pytest.approx(run.data.metrics["test_accuracy"])
    assert again["test_f1_macro"] == pytest.approx(run.data.metrics["test_f1_macro"])
