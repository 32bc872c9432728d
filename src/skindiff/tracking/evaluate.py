"""The `evaluate` stage, and how any classifier evaluation is logged.

A logged classifier carries its class labels and input size in the MLflow model's metadata,
so `evaluate` needs nothing but the model URI and the images.
"""

import hashlib
import tempfile
from collections.abc import Sequence
from pathlib import Path

import mlflow
import pandas as pd

from skindiff.classify.metrics import classification_metrics, confusion_matrix_figure
from skindiff.classify.train import predict
from skindiff.core.manifest import IMAGE_COLUMNS, PREDICTION_COLUMNS, require_columns
from skindiff.data.cohort import select_cohort
from skindiff.data.config import CohortSpec
from skindiff.data.images import check_images
from skindiff.data.metadata import read_metadata
from skindiff.errors import SkindiffError
from skindiff.options import EVALUATE
from skindiff.plans import EvaluateConfig
from skindiff.tracking.classifier_model import load_classifier
from skindiff.tracking.dry_run import WorkCost, active_plan, is_planned
from skindiff.tracking.names import (
    CLASSIFIER_MODEL,
    PREDICTIONS_DIR,
    Stage,
    confusion_figure,
    split_artifact,
)
from skindiff.tracking.runs import load_split
from skindiff.tracking.stage import StageCall, StageInputs, plan_unkeyed_stage, run_stage

ARTIFACT_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:")


def log_evaluation(predictions: pd.DataFrame, labels: Sequence[str], prefix: str) -> dict:
    """Logs metrics, `predictions/<prefix>.csv` and a confusion matrix; returns the metrics."""
    metrics = classification_metrics(predictions, labels, prefix)
    mlflow.log_metrics(metrics)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{prefix}.csv"
        predictions[list(PREDICTION_COLUMNS)].to_csv(path, index=False)
        mlflow.log_artifact(str(path), PREDICTIONS_DIR)
    mlflow.log_figure(confusion_matrix_figure(predictions, labels), confusion_figure(prefix))
    return metrics


def evaluation_rows(config: EvaluateConfig, labels: Sequence[str]) -> pd.DataFrame:
    """The images to evaluate: a manifest as is, or the cohort of a metadata CSV."""
    if config.manifest is not None:
        if config.manifest.startswith(ARTIFACT_SCHEMES):
            with tempfile.TemporaryDirectory() as tmp:
                local = mlflow.artifacts.download_artifacts(config.manifest, dst_path=tmp)
                rows = pd.read_csv(local, keep_default_na=False)
        else:
            if not Path(config.manifest).is_file():
                raise SkindiffError(f"manifest not found: {config.manifest}")
            rows = pd.read_csv(config.manifest, keep_default_na=False)
        if "group" not in rows.columns and "fitzpatrick_scale" in rows.columns:
            groups = dict.fromkeys(config.light_fst, "light") | dict.fromkeys(
                config.dark_fst, "dark"
            )
            rows["group"] = rows["fitzpatrick_scale"].map(groups).fillna("other")
        require_columns(rows, IMAGE_COLUMNS, config.manifest)
    else:
        spec = CohortSpec(config.conditions or tuple(labels), config.light_fst, config.dark_fst)
        cohort = select_cohort(read_metadata(Path(config.metadata_csv)), spec)
        rows = check_images(cohort, Path(config.image_dir)).rows
    unknown = sorted(set(rows["label"]) - set(labels))
    if unknown:
        raise SkindiffError(f"labels the model does not know: {', '.join(unknown)}")
    return rows


def _rows_digest(rows: pd.DataFrame) -> str:
    """Identity of the evaluated images: their annotations and files (their content where the
    manifest has the files' digests, as prepare's have)."""
    columns = [c for c in ("md5hash", "label", "fitzpatrick_scale", "sha256") if c in rows]
    if "sha256" not in columns:
        columns.append("path")
    text = rows[columns].sort_values("md5hash").to_csv(index=False)
    return hashlib.sha256(text.encode()).hexdigest()


def run_evaluate(
    config: EvaluateConfig, *, reuse: bool = False, run_name: str | None = None
) -> str:
    """Evaluates a logged classifier on the given images; returns the run id (with `reuse`,
    of a finished evaluation of the same model on the same images where there is one). The
    run is named `run_name`, by default `evaluate/<config.name>`."""
    run_name = run_name or f"evaluate/{config.name}"
    call = StageCall(Stage.EVALUATE, run_name, EVALUATE.values(config))
    loaded = {}

    def resolve() -> StageInputs:
        try:
            info = mlflow.models.get_model_info(config.model_uri)
        except mlflow.exceptions.MlflowException as err:
            raise SkindiffError(f"model_uri {config.model_uri!r}: {err.message}") from None
        metadata = info.metadata or {}
        if "labels" not in metadata:
            raise SkindiffError(f"{config.model_uri} is not a skindiff classifier (no labels)")
        loaded["labels"] = tuple(metadata["labels"])
        loaded["image_size"] = int(metadata["image_size"])
        loaded["rows"] = evaluation_rows(config, loaded["labels"])
        return StageInputs(digests={"model": info.model_uuid, "rows": _rows_digest(loaded["rows"])})

    def work(inputs: StageInputs, key: str) -> None:
        model = load_classifier(config.model_uri)
        labels = loaded["labels"]
        predictions = predict(
            model, loaded["rows"], labels, loaded["image_size"], config.batch_size
        )
        log_evaluation(predictions, labels, config.name)

    return run_stage(call, resolve, work, reuse=reuse)


def evaluate_on_light(classifier_run_id: str, prepare_run_id: str) -> str:
    """The evaluate run (found or made) of a classifier on its prepare run's light flexible
    subset, named `light` (metrics light_accuracy, light_f1_macro, predictions/light.csv); the
    run is named after the classifier's: `i/seed-0/tiny/real/light`."""
    config = EvaluateConfig(
        model_uri=f"runs:/{classifier_run_id}/{CLASSIFIER_MODEL}",
        manifest=f"runs:/{prepare_run_id}/{split_artifact('flexible_light')}",
        name="light",
    )
    if is_planned(classifier_run_id) or is_planned(prepare_run_id):
        # A dry run: the key holds the model's id, which a classifier not trained has not.
        classifier = active_plan().stage_of(classifier_run_id).run_name
        light = len(load_split(prepare_run_id, "flexible_light"))
        call = StageCall(
            Stage.EVALUATE,
            f"{classifier}/light",
            EVALUATE.values(config),
            cost=lambda inputs: WorkCost(images=light),
        )
        return plan_unkeyed_stage(call, classifier_run_id)
    classifier = mlflow.get_run(classifier_run_id).info.run_name
    return run_evaluate(config, reuse=True, run_name=f"{classifier}/light")
