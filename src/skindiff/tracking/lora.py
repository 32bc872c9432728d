"""Logs the `lora` stage: LoRA weights (diffusers format) trained with the TI tokens."""

import tempfile
from pathlib import Path

import mlflow

from skindiff.core.distributed import run_shared
from skindiff.core.settings import as_text
from skindiff.data.config import PrepareConfig
from skindiff.diffusion.config import LoraConfig, TextualInversionConfig
from skindiff.diffusion.lora import train_lora
from skindiff.options import DATA, LORA, TEXTUAL_INVERSION
from skindiff.tracking.names import EMBEDDINGS_DIR, LORA_WEIGHTS_ARTIFACT, Stage
from skindiff.tracking.runs import fetch_upstream, log_curve
from skindiff.tracking.stage import StageCall, StageInputs, run_stage, work_dir
from skindiff.tracking.textual_inversion import (
    generator_inputs,
    generator_training_images,
    run_textual_inversion,
    training_cost,
)


def run_lora(
    data: PrepareConfig,
    config: LoraConfig,
    prepare_run_id: str | None = None,
    ti_run_id: str | None = None,
    ti_config: TextualInversionConfig | None = None,
    *,
    reuse: bool = False,
) -> str:
    """Trains LoRA on the scenario's `generator_images` with the tokens of `ti_run_id`, or of a
    textual_inversion run found or run with `ti_config`; with neither, the condition names in
    words (the ablation's plain LoRA). Returns the run id (with `reuse`, of a finished run
    with the same key where there is one)."""
    context = DATA.values(data) | (TEXTUAL_INVERSION.values(ti_config) if ti_config else {})
    context |= {"ti_run_id": as_text(ti_run_id)}
    call = StageCall(
        Stage.LORA,
        f"{data.scenario}/seed-{data.seed}/{Stage.LORA}",
        LORA.values(config),
        context,
        f"{config.max_train_steps} steps",
        cost=lambda inputs: training_cost(config),
    )

    def resolve() -> StageInputs:
        inputs = generator_inputs(data, prepare_run_id, config.base_model, config.generator_images)
        ti = ti_run_id
        if ti_config and not ti:
            ti = run_textual_inversion(data, ti_config, inputs.prepare_run_id, reuse=True)
        inputs.upstream[Stage.TEXTUAL_INVERSION] = ti
        return inputs

    def work(inputs: StageInputs, key: str) -> None:
        ti = inputs.upstream[Stage.TEXTUAL_INVERSION]
        with tempfile.TemporaryDirectory() as tmp:
            embeddings = None
            if ti:
                embeddings = fetch_upstream(
                    ti, Stage.TEXTUAL_INVERSION, EMBEDDINGS_DIR, config.base_model, Path(tmp)
                )
            result = run_shared(
                train_lora,
                config,
                generator_training_images(inputs),
                embeddings,
                work_dir(Stage.LORA, key),
            )
        mlflow.log_artifact(str(result.weights_path), str(Path(LORA_WEIGHTS_ARTIFACT).parent))
        log_curve("loss", result.losses)

    return run_stage(call, resolve, work, reuse=reuse)
