"""Logs the `textual_inversion` stage: embeddings, loss curve, validation samples."""

import mlflow
import pandas as pd

from skindiff.data.prepare import PrepareConfig, content_digest
from skindiff.diffusion.base_model import base_model_fingerprint, resolve_base_model
from skindiff.diffusion.textual_inversion import TextualInversionConfig, train_textual_inversion
from skindiff.options import DATA, TEXTUAL_INVERSION, option_values
from skindiff.tracking.prepare import ensure_prepare, load_split
from skindiff.tracking.reuse import RUN_KEY_TAG, find_finished_run, run_key, work_dir
from skindiff.tracking.runs import log_curve, stage_run

STAGE = "textual_inversion"
PREPARE_RUN_TAG = "skindiff.prepare_run_id"


def model_fingerprint(base_model: str) -> str:
    return base_model_fingerprint(resolve_base_model(base_model))


def textual_inversion_key(config: TextualInversionConfig, train: pd.DataFrame) -> str:
    """Same training images, settings, base model and code: same embeddings."""
    inputs = {"train": content_digest(train), "base_model": model_fingerprint(config.base_model)}
    return run_key(STAGE, option_values(TEXTUAL_INVERSION, config), inputs)


def run_textual_inversion(
    data: PrepareConfig, config: TextualInversionConfig, prepare_run_id: str = ""
) -> str:
    """Trains one token per condition on the scenario's training split; returns the run id."""
    params = option_values(DATA, data) | option_values(TEXTUAL_INVERSION, config)
    run_name = f"{data.scenario}/seed-{data.seed}/{STAGE}"
    with stage_run(STAGE, run_name, params) as run:
        prepare_run_id = prepare_run_id or ensure_prepare(data)
        train = load_split(prepare_run_id, "train")
        key = textual_inversion_key(config, train)
        mlflow.set_tags({RUN_KEY_TAG: key, PREPARE_RUN_TAG: prepare_run_id})
        result = train_textual_inversion(config, train, work_dir(STAGE, key))
        mlflow.log_artifacts(str(result.embeddings_dir), "embeddings")
        mlflow.set_tags({f"skindiff.token.{c}": t for c, t in result.tokens.items()})
        log_curve("loss", result.losses)
        if result.validation_images:
            mlflow.log_artifact(str(result.validation_images), "validation")
    return run.info.run_id


def ensure_textual_inversion(
    data: PrepareConfig, config: TextualInversionConfig, prepare_run_id: str
) -> str:
    """A finished run with the same key, or a new one (nested under the active run)."""
    found = find_finished_run(textual_inversion_key(config, load_split(prepare_run_id, "train")))
    return found.info.run_id if found else run_textual_inversion(data, config, prepare_run_id)
