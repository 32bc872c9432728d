"""Logs the `textual_inversion` stage: embeddings, loss curves (one per token, `loss/<slug>` of
its condition, and their mean, `loss`), validation samples, a tag `skindiff.token.<slug>` naming
each condition's token, and how many images it trained on (`n_training_images`, per skin group
`n_training_images_<group>`; LoRA logs them too)."""

import mlflow
import numpy as np
import pandas as pd

from skindiff.core.distributed import run_shared
from skindiff.core.labels import slug
from skindiff.data.cohort import DARK, LIGHT
from skindiff.data.config import PrepareConfig
from skindiff.diffusion.base_model import base_model_fingerprint, resolve_base_model
from skindiff.diffusion.config import GeneratorImages, LoraConfig, TextualInversionConfig
from skindiff.diffusion.costs import unet_flops
from skindiff.diffusion.textual_inversion import train_textual_inversion
from skindiff.options import DATA, TEXTUAL_INVERSION
from skindiff.tracking.dry_run import WorkCost
from skindiff.tracking.names import EMBEDDINGS_DIR, VALIDATION_DIR, Stage, token_tag
from skindiff.tracking.prepare import split_inputs
from skindiff.tracking.runs import log_curve
from skindiff.tracking.stage import StageCall, StageInputs, run_stage, work_dir

GROUPS = (LIGHT, DARK)


def generator_inputs(
    data: PrepareConfig,
    prepare_run_id: str | None,
    base_model: str,
    images: GeneratorImages = GeneratorImages.TRAIN,
) -> StageInputs:
    """The inputs every generator stage has: the splits of `images` (what Textual Inversion and
    LoRA train on; generation's sources are the classifier's training split) and the base
    model."""
    inputs = split_inputs(data, prepare_run_id, images.splits)
    inputs.digests["base_model"] = base_model_fingerprint(resolve_base_model(base_model))
    return inputs


def training_cost(config: TextualInversionConfig | LoraConfig, streams: int = 1) -> WorkCost:
    """A generator training stage's cost on one process: every optimizer step draws batch x
    accumulation images from each of `streams`, each a UNet forward and backward pass."""
    images = (
        config.max_train_steps * config.train_batch_size * config.gradient_accumulation_steps
    ) * streams
    flops = unet_flops(config.base_model, config.resolution, training=True)
    return WorkCost(config.max_train_steps, images, images, images * flops)


def generator_training_images(inputs: StageInputs) -> pd.DataFrame:
    """The rows of every split `generator_inputs` loaded, as one training set; how many there
    are, in all and per skin group, is logged to the active run."""
    rows = pd.concat(inputs.splits.values(), ignore_index=True)
    per_group = rows["group"].value_counts()
    mlflow.log_metrics(
        {"n_training_images": len(rows)}
        | {f"n_training_images_{group}": int(per_group.get(group, 0)) for group in GROUPS}
    )
    return rows


def run_textual_inversion(
    data: PrepareConfig,
    config: TextualInversionConfig,
    prepare_run_id: str | None = None,
    *,
    reuse: bool = False,
) -> str:
    """Trains one token per condition on the scenario's `generator_images`; returns the run id
    (with `reuse`, of a finished run with the same key where there is one)."""
    call = StageCall(
        Stage.TEXTUAL_INVERSION,
        f"{data.scenario}/seed-{data.seed}/{Stage.TEXTUAL_INVERSION}",
        TEXTUAL_INVERSION.values(config),
        DATA.values(data),
        f"{len(config.conditions)} tokens, {config.max_train_steps} steps"
        + (" each" if config.per_token else ""),
        cost=lambda inputs: training_cost(
            config, len(config.conditions) if config.per_token else 1
        ),
    )

    def work(inputs: StageInputs, key: str) -> None:
        result = run_shared(
            train_textual_inversion,
            config,
            generator_training_images(inputs),
            work_dir(Stage.TEXTUAL_INVERSION, key),
        )
        mlflow.log_artifacts(str(result.embeddings_dir), EMBEDDINGS_DIR)
        mlflow.set_tags({token_tag(c): t for c, t in result.tokens.items()})
        for stream, losses in result.losses.items():
            log_curve(f"loss/{slug(stream)}", losses)
        # One curve to compare runs by: the mean over the tokens at each step.
        log_curve("loss", np.mean(list(result.losses.values()), axis=0).tolist())
        if result.validation_images:
            mlflow.log_artifact(str(result.validation_images), VALIDATION_DIR)

    return run_stage(
        call,
        lambda: generator_inputs(data, prepare_run_id, config.base_model, config.generator_images),
        work,
        reuse=reuse,
    )
