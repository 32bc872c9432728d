"""LoRA fine-tuning of the UNet's attention on skin-type captions.

The text encoder is frozen and carries the Textual Inversion tokens; VAE and base UNet are
frozen too. Under fp16 or bf16 mixed precision the frozen weights stay float32 by default, as
the reference's LoRA script keeps them under fp16, and autocast does the half-precision math
(`frozen_weights`). Each image is captioned "An image of {token} on the skin of {phrase}
individual" (the condition in words when there are no tokens: the paper's "lora" ablation).
The adapter is saved in diffusers' format, loadable by a stock pipeline's `load_lora_weights`.
"""

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from diffusers import StableDiffusionPipeline
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig as PeftLoraConfig
from peft.utils import get_peft_model_state_dict

from skindiff.core.device import fused_adam, resolve_mixed_precision, weight_dtype
from skindiff.core.files import canonical_safetensors, replaced_directory
from skindiff.core.seeding import seeded_global_rng
from skindiff.core.settings import Precision
from skindiff.diffusion.adapters import LORA_WEIGHTS_FILE, read_embeddings
from skindiff.diffusion.config import FrozenWeights, LoraConfig
from skindiff.diffusion.prompts import SKIN_TYPE_PHRASES, placeholder_token, skin_prompt
from skindiff.diffusion.train_data import ManifestImageDataset, check_training_rows
from skindiff.diffusion.training import (
    FrozenEncodings,
    LoopSettings,
    MicroBatchDraws,
    TrainingStream,
    add_token_embeddings,
    finish_run,
    freeze,
    load_base_pipeline,
    make_accelerator,
    noise_prediction_loss,
    noise_scheduler_of,
    open_run_dir,
    place,
    read_losses,
    resolve_resolution,
    rows_digest,
    run_training_loop,
)
from skindiff.errors import SkindiffError, require

LORA_DIR = "lora"


@dataclass(frozen=True)
class LoraResult:
    weights_path: Path  # out_dir / "lora" / "pytorch_lora_weights.safetensors"
    losses: list[float]


def _training_rows(train: pd.DataFrame) -> pd.DataFrame:
    rows = check_training_rows(train)
    unknown = sorted(set(rows["fitzpatrick_scale"]) - set(SKIN_TYPE_PHRASES))
    require(
        not unknown,
        f"train has Fitzpatrick skin types without a caption phrase: {unknown} "
        f"(known: {sorted(SKIN_TYPE_PHRASES)})",
    )
    return rows


def _concepts(rows: pd.DataFrame, embeddings: dict[str, torch.Tensor] | None) -> dict[str, str]:
    """Condition -> the words that name it in captions: its token, or the condition itself."""
    conditions = sorted(set(rows["label"]))
    if embeddings is None:
        return {condition: condition for condition in conditions}
    missing = [c for c in conditions if placeholder_token(c) not in embeddings]
    require(
        not missing,
        f"embeddings_dir has no token for the condition(s) {', '.join(missing)} "
        f"(it has {', '.join(sorted(embeddings))})",
    )
    return {condition: placeholder_token(condition) for condition in conditions}


def _embeddings_digest(embeddings: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for token in sorted(embeddings):
        digest.update(token.encode() + embeddings[token].float().numpy().tobytes())
    return digest.hexdigest()


def _stable_metadata(adapter: PeftLoraConfig) -> dict:
    """The adapter's settings with its sets as sorted lists: a set's order (peft keeps
    `target_modules` as one) changes from process to process, and would change the file."""
    return {
        key: sorted(value) if isinstance(value, set | frozenset) else value
        for key, value in adapter.to_dict().items()
    }


def frozen_dtype(frozen_weights: FrozenWeights, precision: Precision) -> torch.dtype:
    """The dtype of the frozen UNet, VAE and text encoder under a resolved mixed precision."""
    return torch.float32 if frozen_weights == FrozenWeights.FULL else weight_dtype(precision)


def train_lora(
    config: LoraConfig,
    train: pd.DataFrame,
    embeddings_dir: Path | None,
    out_dir: Path,
    progress: bool = True,
) -> LoraResult:
    """Trains a LoRA adapter of the UNet on `train` into `out_dir` (resumes an interrupted run
    there; returns a finished one without training, after waiting for a process training
    there). `embeddings_dir`: Textual Inversion tokens to caption with, or None to name
    conditions in words."""
    rows = _training_rows(train)
    embeddings = None if embeddings_dir is None else read_embeddings(embeddings_dir)
    concepts = _concepts(rows, embeddings)
    out_dir = Path(out_dir)
    resolve_mixed_precision(config.mixed_precision)  # refused before the folder is claimed
    identity = {
        "stage": "lora",
        "config": asdict(config),
        "train": rows_digest(rows),
        "embeddings": None if embeddings is None else _embeddings_digest(embeddings),
    }
    with open_run_dir(out_dir, identity) as finished:
        if not finished:
            _train(config, rows, embeddings, concepts, out_dir, progress)
        return LoraResult(
            weights_path=out_dir / LORA_DIR / LORA_WEIGHTS_FILE, losses=read_losses(out_dir)
        )


def _train(
    config: LoraConfig,
    rows: pd.DataFrame,
    embeddings: dict[str, torch.Tensor] | None,
    concepts: dict[str, str],
    out_dir: Path,
    progress: bool,
) -> None:
    accelerator = make_accelerator(config.mixed_precision)
    device = accelerator.device
    pipeline = load_base_pipeline(config.base_model)
    resolution = resolve_resolution(pipeline, config.resolution)
    if embeddings is not None:
        add_token_embeddings(pipeline, embeddings)

    dtype = frozen_dtype(config.frozen_weights, resolve_mixed_precision(config.mixed_precision))
    freeze(pipeline.vae, device, dtype)
    freeze(pipeline.text_encoder, device, dtype)
    unet = pipeline.unet
    unet.requires_grad_(False)
    adapter = PeftLoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        init_lora_weights="gaussian",
        target_modules=list(config.target_modules),
    )
    try:
        # Added on the CPU before moving, so the initial A matrices are the same on any device.
        with seeded_global_rng(config.seed):
            unet.add_adapter(adapter)
    except ValueError as err:
        raise SkindiffError(f"target_modules {config.target_modules}: {err}") from None
    place(unet, device, dtype)
    cast_training_params(unet, dtype=torch.float32)  # the adapter trains in full precision
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    trained = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trained,
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
        fused=fused_adam(trained),
    )
    prepared_unet, optimizer = accelerator.prepare(unet, optimizer)
    noise_scheduler = noise_scheduler_of(pipeline)
    dataset = ManifestImageDataset(rows, resolution, "lora", config.seed)
    encodings = FrozenEncodings(pipeline.vae, pipeline.text_encoder)
    settings = LoopSettings.of(config)
    encodings.encode_fixed_images(
        dataset,
        config.max_train_steps * settings.draws_per_step(accelerator.num_processes),
        progress and accelerator.is_main_process,
    )

    def step_loss(batch: dict, draws: MicroBatchDraws) -> torch.Tensor:
        latents = encodings.latents(batch["pixel_values"], batch["key"], draws)
        captions = [
            skin_prompt(concepts[condition], int(fst))
            for condition, fst in zip(batch["condition"], batch["fitzpatrick_scale"], strict=True)
        ]
        hidden = encodings.caption_states(pipeline, captions)
        return noise_prediction_loss(
            prepared_unet, noise_scheduler, latents, hidden, draws, snr_gamma=config.snr_gamma
        )

    losses = run_training_loop(
        accelerator,
        prepared_unet,
        optimizer,
        {"lora": TrainingStream(dataset, config.seed)},
        step_loss,
        settings,
        out_dir,
        learning_rate_option="--lora-learning-rate",
        progress=progress,
        desc="lora",
    )["lora"]
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(prepared_unet)
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(trained))
        with replaced_directory(out_dir / LORA_DIR) as folder:
            StableDiffusionPipeline.save_lora_weights(
                folder,
                unet_lora_layers=layers,
                # Carries rank and alpha, so a loader scales by alpha / rank as trained.
                unet_lora_adapter_metadata=_stable_metadata(trained.peft_config["default"]),
                weight_name=LORA_WEIGHTS_FILE,
                safe_serialization=True,
            )
            canonical_safetensors(folder / LORA_WEIGHTS_FILE)
        finish_run(out_dir, losses)
    accelerator.wait_for_everyone()
