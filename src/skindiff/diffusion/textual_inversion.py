"""Textual Inversion: one new token per skin condition, trained as the reference trains it.

The reference runs Textual Inversion once per condition. Here the base model is loaded once and,
by default (`per_token`), every token still trains as its own run: each optimizer step draws a
full batch (batch x accumulation) of its condition's images only, from its own seeded stream,
and the gradients of different tokens touch different rows of the embedding matrix, so AdamW
(elementwise) moves each token exactly as a run on its condition alone would. With `per_token`
false, one stream of batches mixes all conditions (cheaper: each token then sees only its
condition's share of every batch).

Only the new rows of the token-embedding matrix train; text encoder, VAE and UNet stay frozen.
Each image is captioned with a random template (by default the reference code's 11, see
`TiTemplates`) filled with its condition's token.
Every token is saved in diffusers' format, `{token: tensor[num_vectors, dim]}`, so a stock
pipeline's `load_textual_inversion` loads it.
"""

import io
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from diffusers.utils import make_image_grid
from safetensors.torch import save_file

from skindiff.core.device import fused_adam, resolve_mixed_precision, weight_dtype
from skindiff.core.files import replaced_directory, write_atomic
from skindiff.core.seeding import derived_seed
from skindiff.diffusion.adapters import token_file_name
from skindiff.diffusion.config import TextualInversionConfig
from skindiff.diffusion.prompts import placeholder_token
from skindiff.diffusion.train_data import ManifestImageDataset, check_training_rows
from skindiff.diffusion.training import (
    FrozenEncodings,
    LoopSettings,
    MicroBatchDraws,
    TrainingStream,
    add_token_embeddings,
    encode_captions,
    finish_run,
    freeze,
    load_base_pipeline,
    make_accelerator,
    noise_prediction_loss,
    noise_scheduler_of,
    open_run_dir,
    read_losses,
    resolve_resolution,
    rows_digest,
    run_training_loop,
    token_ids,
)
from skindiff.errors import require

EMBEDDINGS_DIR = "embeddings"
VALIDATION_FILE = "validation.png"
VALIDATION_PROMPT = "a photo of a {}"
VALIDATION_STEPS = 25  # as the diffusers Textual Inversion example validates


@dataclass(frozen=True)
class TextualInversionResult:
    embeddings_dir: Path  # one <token-without-brackets>.safetensors per condition
    tokens: dict[str, str]  # condition -> placeholder token
    losses: dict[str, list[float]]  # loss per step of each condition's token, or of "all"
    validation_images: Path | None  # a grid of samples, one per condition


def _training_rows(config: TextualInversionConfig, train: pd.DataFrame) -> pd.DataFrame:
    """The rows of the configured conditions; each condition needs at least one."""
    rows = check_training_rows(train)
    rows = rows[rows["label"].isin(config.conditions)].reset_index(drop=True)
    missing = [c for c in config.conditions if c not in set(rows["label"])]
    require(
        not missing,
        f"train has no images of the condition(s) {', '.join(missing)}; "
        "add images or leave them out of conditions",
    )
    return rows


def train_textual_inversion(
    config: TextualInversionConfig, train: pd.DataFrame, out_dir: Path, progress: bool = True
) -> TextualInversionResult:
    """Learns every condition's token on `train` into `out_dir` (resumes an interrupted run
    there; returns a finished one without training, after waiting for a process training
    there). Rows of other conditions are ignored."""
    rows = _training_rows(config, train)
    out_dir = Path(out_dir)
    tokens = {condition: placeholder_token(condition) for condition in config.conditions}
    resolve_mixed_precision(config.mixed_precision)  # refused before the folder is claimed
    identity = {"stage": "textual_inversion", "config": asdict(config), "train": rows_digest(rows)}
    with open_run_dir(out_dir, identity) as finished:
        if not finished:
            _train(config, rows, tokens, out_dir, progress)
        validation = out_dir / VALIDATION_FILE
        return TextualInversionResult(
            embeddings_dir=out_dir / EMBEDDINGS_DIR,
            tokens=tokens,
            losses=read_losses(out_dir),
            validation_images=validation if validation.is_file() else None,
        )


SHARED_STREAM = "all"


def _streams(
    config: TextualInversionConfig, rows: pd.DataFrame, resolution: int
) -> dict[str, TrainingStream]:
    """One stream per condition (seeded by the condition's name, so a token's draws do not
    depend on which other conditions share the run), or one shared stream."""
    if not config.per_token:
        dataset = ManifestImageDataset(rows, resolution, "ti", config.seed)
        return {SHARED_STREAM: TrainingStream(dataset, config.seed)}
    streams = {}
    for condition in config.conditions:
        seed = derived_seed(f"textual_inversion/{condition}", config.seed)
        dataset = ManifestImageDataset(rows[rows["label"] == condition], resolution, "ti", seed)
        streams[condition] = TrainingStream(dataset, seed)
    return streams


def draw_captions(
    templates: tuple[str, ...], tokens: list[str], draws: MicroBatchDraws
) -> list[str]:
    """A caption per image of a pass: one of `templates`, drawn by its micro-batch's
    generator, filled with the image's token."""
    picks = draws.each(
        lambda generator, items: torch.randint(
            len(templates), (len(tokens[items]),), generator=generator, device=generator.device
        )
    )
    return [
        templates[pick].format(token) for pick, token in zip(picks.tolist(), tokens, strict=True)
    ]


def _train(
    config: TextualInversionConfig,
    rows: pd.DataFrame,
    tokens: dict[str, str],
    out_dir: Path,
    progress: bool,
) -> None:
    accelerator = make_accelerator(config.mixed_precision)
    device = accelerator.device
    pipeline = load_base_pipeline(config.base_model)
    resolution = resolve_resolution(pipeline, config.resolution)
    initializer = pipeline.tokenizer.encode(config.initializer_word, add_special_tokens=False)
    require(
        len(initializer) == 1,
        f"initializer_word must be one token of the tokenizer; {config.initializer_word!r} "
        f"is {len(initializer)}",
    )
    start = pipeline.text_encoder.get_input_embeddings().weight[initializer[0]].detach()
    add_token_embeddings(
        pipeline, {token: start.repeat(config.num_vectors, 1) for token in tokens.values()}
    )
    ids = {condition: token_ids(pipeline, token) for condition, token in tokens.items()}

    dtype = weight_dtype(resolve_mixed_precision(config.mixed_precision))
    freeze(pipeline.vae, device, dtype)
    freeze(pipeline.unet, device, dtype)
    text_encoder = pipeline.text_encoder  # stays float32: its embedding matrix trains
    text_encoder.requires_grad_(False)
    embedding = text_encoder.get_input_embeddings().weight
    embedding.requires_grad_(True)
    scale = config.train_batch_size * config.gradient_accumulation_steps
    learning_rate = config.learning_rate * (
        scale * accelerator.num_processes if config.scale_lr else 1
    )
    optimizer = torch.optim.AdamW(
        [embedding],
        lr=learning_rate,
        weight_decay=config.weight_decay,
        fused=fused_adam([embedding]),
    )
    prepared_encoder, optimizer = accelerator.prepare(text_encoder, optimizer)

    # AdamW (weight decay, and updates from the template words) moves every row; all but the
    # new tokens' rows are put back after each step, so they end bit-identical.
    frozen_rows = torch.ones(len(embedding), dtype=torch.bool, device=device)
    frozen_rows[[i for row_ids in ids.values() for i in row_ids]] = False
    original = embedding.detach().clone()

    def restore_frozen_rows() -> None:
        with torch.no_grad():
            embedding[frozen_rows] = original[frozen_rows]

    noise_scheduler = noise_scheduler_of(pipeline)
    streams = _streams(config, rows, resolution)
    encodings = FrozenEncodings(pipeline.vae)
    settings = LoopSettings.of(config)
    run_draws = config.max_train_steps * settings.draws_per_step(accelerator.num_processes)
    for stream in streams.values():
        encodings.encode_fixed_images(
            stream.dataset, run_draws, progress and accelerator.is_main_process
        )

    def step_loss(batch: dict, draws: MicroBatchDraws) -> torch.Tensor:
        latents = encodings.latents(batch["pixel_values"], batch["key"], draws)
        captions = draw_captions(
            config.templates.texts, [tokens[condition] for condition in batch["condition"]], draws
        )
        hidden = encode_captions(pipeline, prepared_encoder, captions, device)
        return noise_prediction_loss(pipeline.unet, noise_scheduler, latents, hidden, draws)

    losses = run_training_loop(
        accelerator,
        prepared_encoder,
        optimizer,
        streams,
        step_loss,
        settings,
        out_dir,
        after_step=restore_frozen_rows,
        learning_rate_option="--ti-learning-rate",
        progress=progress,
        desc="textual_inversion",
    )
    if accelerator.is_main_process:
        weights = embedding.detach().float().cpu()
        with replaced_directory(out_dir / EMBEDDINGS_DIR) as folder:
            for condition, token in tokens.items():
                save_file({token: weights[ids[condition]].clone()}, folder / token_file_name(token))
        with accelerator.autocast():
            images = pipeline(
                [VALIDATION_PROMPT.format(token) for token in tokens.values()],
                num_inference_steps=VALIDATION_STEPS,
                height=resolution,
                width=resolution,
                generator=torch.Generator(device).manual_seed(config.seed),
            ).images
        grid = io.BytesIO()
        make_image_grid(images, rows=1, cols=len(images)).save(grid, format="PNG")
        write_atomic(out_dir / VALIDATION_FILE, grid.getvalue())
        finish_run(out_dir, losses)
    accelerator.wait_for_everyone()
