"""Logs the `lora` stage: LoRA weights (diffusers format) trained with the TI tokens."""

import tempfile
from pathlib import Path

import mlflow
import pandas as pd

from skindiff.data.prepare import PrepareConfig, content_digest
from skindiff.diffusion.lora import LoraConfig, train_lora
from skindiff.diffusion.textual_inversion import TextualInversionConfig
from skindiff.options import DATA, LORA, TEXTUAL_INVERSION, option_values
from skindiff.tracking.prepare import ensure_prepare, load_split
from skindiff.tracking.reuse import RUN_KEY_TAG, find_finished_run, run_key, work_dir
from skindiff.tracking.runs import fetch_upstream, log_curve, stage_run
from skindiff.tracking.textual_inversion import (
    PREPARE_RUN_TAG,
    ensure_textual_inversion,
    model_fingerprint,
)

STAGE = "lora"
TI_RUN_TAG = "skindiff.textual_inversion_run_id"
WEIGHTS_ARTIFACT = "lora/pytorch_lora_weights.safetensors"


def upstream_key(run_id: str) -> str:
    """What identifies an upstream run's output: its reuse key, else its id."""
    return mlflow.get_run(run_id).data.tags.get(RUN_KEY_TAG, run_id) if run_id else ""


def lora_key(config: LoraConfig, train: pd.DataFrame, ti_run_id: str) -> str:
    """Same images, settings, base model, tokens and code: same LoRA weights."""
    inputs = {
        "train": content_digest(train),
        "base_model": model_fingerprint(config.base_model),
        "textual_inversion": upstream_key(ti_run_id),
    }
    return run_key(STAGE, option_values(LORA, config), inputs)


def run_lora(
    data: PrepareConfig,
    config: LoraConfig,
    prepare_run_id: str = "",
    ti_run_id: str = "",
    ti_config: TextualInversionConfig | None = None,
) -> str:
    """Trains LoRA on the scenario's training split with the tokens of `ti_run_id`, or of a
    textual_inversion run found or run with `ti_config`; with neither, the condition names in
    words (the ablation's plain LoRA). Returns the run id."""
    params = option_values(DATA, data) | option_values(LORA, config)
    if ti_config:
        params |= option_values(TEXTUAL_INVERSION, ti_config)
    run_name = f"{data.scenario}/seed-{data.seed}/{STAGE}"
    with stage_run(STAGE, run_name, params | {"ti_run_id": ti_run_id}) as run:
        prepare_run_id = prepare_run_id or ensure_prepare(data)
        if ti_config and not ti_run_id:
            ti_run_id = ensure_textual_inversion(data, ti_config, prepare_run_id)
        train = load_split(prepare_run_id, "train")
        key = lora_key(config, train, ti_run_id)
        mlflow.set_tags({RUN_KEY_TAG: key, PREPARE_RUN_TAG: prepare_run_id, TI_RUN_TAG: ti_run_id})
        with tempfile.TemporaryDirectory() as tmp:
            embeddings = None
            if ti_run_id:
                embeddings = fetch_upstream(
                    ti_run_id, "textual_inversion", "embeddings", config.base_model, Path(tmp)
                )
            result = train_lora(config, train, embeddings, work_dir(STAGE, key))
        mlflow.log_artifact(str(result.weights_path), str(Path(WEIGHTS_ARTIFACT).parent))
        log_curve("loss", result.losses)
    return run.info.run_id


def ensure_lora(
    data: PrepareConfig, config: LoraConfig, prepare_run_id: str, ti_run_id: str
) -> str:
    """A finished run with the same key, or a new one (nested under the active run)."""
    found = find_finished_run(lora_key(config, load_split(prepare_run_id, "train"), ti_run_id))
    return found.info.run_id if found else run_lora(data, config, prepare_run_id, ti_run_id)
