"""The `evaluate` stage, and how any classifier evaluation is logged.

A logged classifier carries its class labels and input size in the MLflow model's metadata,
so `evaluate` needs nothing but the model URI and the images.
"""

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
import mlflow.pytorch
import pandas as pd

from skindiff.classify.metrics import classification_metrics, confusion_matrix_figure
from skindiff.classify.train import predict
from skindiff.data.cohort import CohortSpec, select_cohort
from skindiff.data.images import check_images
from skindiff.data.metadata import read_metadata
from skindiff.errors import SkindiffError
from skindiff.options import as_text
from skindiff.tracking.runs import stage_run

PREDICTION_COLUMNS = ["md5hash", "label", "predicted", "fitzpatrick_scale", "group"]


@dataclass(frozen=True)
class EvaluateConfig:
    """What to evaluate, on which images. Give `manifest`, or `metadata_csv` + `image_dir`."""

    model_uri: str = ""
    manifest: str = ""  # a split manifest CSV (e.g. a prepare run's splits/test.csv)
    metadata_csv: str = ""
    image_dir: str = ""
    conditions: tuple[str, ...] = ()  # empty: the model's classes
    light_fst: tuple[int, ...] = (1, 2)
    dark_fst: tuple[int, ...] = (5, 6)
    name: str = "test"  # metric prefix: test_accuracy, ...
    batch_size: int = 64

    def __post_init__(self) -> None:
        if not self.model_uri:
            raise SkindiffError("model_uri is empty: give runs:/<run id>/model or models:/...")
        if bool(self.manifest) == bool(self.metadata_csv or self.image_dir):
            raise SkindiffError("give either manifest, or metadata_csv and image_dir")
        if not self.manifest and not (self.metadata_csv and self.image_dir):
            raise SkindiffError("metadata_csv and image_dir must be given together")


def log_evaluation(predictions: pd.DataFrame, labels: Sequence[str], prefix: str) -> dict:
    """Logs metrics, `predictions/<prefix>.csv` and a confusion matrix; returns the metrics."""
    metrics = classification_metrics(predictions, labels, prefix)
    mlflow.log_metrics(metrics)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{prefix}.csv"
        predictions[PREDICTION_COLUMNS].to_csv(path, index=False)
        mlflow.log_artifact(str(path), "predictions")
    mlflow.log_figure(
        confusion_matrix_figure(predictions, labels), f"figures/confusion_{prefix}.png"
    )
    return metrics


def evaluation_rows(config: EvaluateConfig, labels: Sequence[str]) -> pd.DataFrame:
    """The images to evaluate: a manifest as is, or the cohort of a metadata CSV."""
    if config.manifest:
        if config.manifest.startswith(("runs:/", "models:/", "mlflow-artifacts:")):
            with tempfile.TemporaryDirectory() as tmp:
                local = mlflow.artifacts.download_artifacts(config.manifest, dst_path=tmp)
                rows = pd.read_csv(local, keep_default_na=False)
        else:
            if not Path(config.manifest).is_file():
                raise SkindiffError(f"manifest not found: {config.manifest}")
            rows = pd.read_csv(config.manifest, keep_default_na=False)
        missing = {"md5hash", "label", "fitzpatrick_scale", "path"} - set(rows.columns)
        if missing:
            raise SkindiffError(
                f"{config.manifest}: missing column(s) {', '.join(sorted(missing))}"
            )
        if "group" not in rows.columns:
            groups = dict.fromkeys(config.light_fst, "light") | dict.fromkeys(
                config.dark_fst, "dark"
            )
            rows["group"] = rows["fitzpatrick_scale"].map(groups).fillna("other")
    else:
        spec = CohortSpec(config.conditions or tuple(labels), config.light_fst, config.dark_fst)
        cohort = select_cohort(read_metadata(Path(config.metadata_csv)), spec)
        rows = check_images(cohort, Path(config.image_dir)).rows
    unknown = sorted(set(rows["label"]) - set(labels))
    if unknown:
        raise SkindiffError(f"labels the model does not know: {', '.join(unknown)}")
    return rows


def run_evaluate(config: EvaluateConfig) -> str:
    """Evaluates a logged classifier on the given images; returns the run id."""
    params = {key: as_text(value) for key, value in vars(config).items()}
    with stage_run("evaluate", f"evaluate/{config.name}", params) as run:
        try:
            info = mlflow.models.get_model_info(config.model_uri)
        except mlflow.exceptions.MlflowException as err:
            raise SkindiffError(f"model_uri {config.model_uri!r}: {err.message}") from None
        metadata = info.metadata or {}
        if "labels" not in metadata:
            raise SkindiffError(f"{config.model_uri} is not a skindiff classifier (no labels)")
        labels = tuple(metadata["labels"])
        rows = evaluation_rows(config, labels)
        model = mlflow.pytorch.load_model(config.model_uri, map_location="cpu")
        predictions = predict(model, rows, labels, int(metadata["image_size"]), config.batch_size)
        log_evaluation(predictions, labels, config.name)
    return run.info.run_id
