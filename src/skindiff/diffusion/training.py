"""What Textual Inversion and LoRA training share.

- the base model as a pipeline plus a DDPM noise scheduler, tokens added the way diffusers'
  own loader adds them (so training and generation name multi-vector tokens alike);
- the frozen encoders' outputs, computed once per distinct input (`FrozenEncodings`);
- the noise-prediction loss, with optional Min-SNR weighting;
- an accelerate loop with resumable checkpoints and a loss curve.

An output folder holds `run.json` (what the run is), `checkpoints/step-<n>` while training,
and, once finished, the stage's outputs, `losses.json` and a `done` marker written last. One
process at a time trains in it; another waits, then finds the run done.
Randomness comes from generators seeded by (seed, step, ...), never from global state, so a
resumed run repeats exactly what an uninterrupted one would have done.
"""

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import compute_snr
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import CLIPTokenizer

from skindiff.core.device import non_finite_remedy, resolve_mixed_precision
from skindiff.core.distributed import process_state
from skindiff.core.files import atomic_directory, claim_folder, work_folder_lock, write_atomic
from skindiff.core.seeding import seeded_generator, seeded_global_rng
from skindiff.core.settings import Precision
from skindiff.diffusion.adapters import load_token_embeddings
from skindiff.diffusion.base_model import resolve_base_model
from skindiff.diffusion.config import MicroBatchPasses
from skindiff.diffusion.tokenizer import MAX_LENGTH
from skindiff.diffusion.train_data import ManifestImageDataset, collate_draws
from skindiff.errors import SkindiffError, require

log = logging.getLogger(__name__)

LOSSES_FILE = "losses.json"
DONE_FILE = "done"
CHECKPOINTS = "checkpoints"
TRAINABLE_FILE = "trainable.safetensors"
# Checkpoints are written atomically, so the latest one is always complete: keep only it.
KEEP_CHECKPOINTS = 1
_STEP_DIR = re.compile(r"step-(\d+)")


# --- the output folder ----------------------------------------------------------------------


def rows_digest(rows: pd.DataFrame) -> str:
    """Identity of a training set: its images, labels and skin types, in order (order matters,
    as it fixes the draws)."""
    columns = rows[["md5hash", "label", "fitzpatrick_scale"]]
    return hashlib.sha256(columns.to_csv(index=False).encode()).hexdigest()


@contextlib.contextmanager
def open_run_dir(out_dir: Path, identity: dict) -> Iterator[bool]:
    """Holds `out_dir` (see `work_folder_lock`) for the block and claims it for the run
    described by `identity` (see `claim_folder`); yields True if that run already finished
    there. In a launch the main process holds and claims it for all processes."""
    state = process_state()
    with work_folder_lock(out_dir) if state.is_main_process else contextlib.nullcontext():
        if state.is_main_process:
            claim_folder(out_dir, identity)
        state.wait_for_everyone()
        yield (out_dir / DONE_FILE).is_file()


def finish_run(out_dir: Path, losses: list[float] | dict[str, list[float]]) -> None:
    """Persists the loss curve, marks the run done (last), then drops its checkpoints."""
    write_atomic(out_dir / LOSSES_FILE, json.dumps(losses).encode())
    write_atomic(out_dir / DONE_FILE, b"")
    shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)


def read_losses(out_dir: Path) -> list[float] | dict[str, list[float]]:
    return json.loads((out_dir / LOSSES_FILE).read_text())


# --- the base model -------------------------------------------------------------------------


def load_base_pipeline(base_model: str) -> StableDiffusionPipeline:
    """The base model as a float32 CPU pipeline; its parts are what training starts from."""
    folder = resolve_base_model(base_model)
    tokenizer = CLIPTokenizer.from_pretrained(
        folder, subfolder="tokenizer", model_max_length=MAX_LENGTH
    )
    pipeline = StableDiffusionPipeline.from_pretrained(
        folder,
        tokenizer=tokenizer,
        dtype=torch.float32,  # what trains must be float32, whatever the files hold
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def noise_scheduler_of(pipeline: StableDiffusionPipeline) -> DDPMScheduler:
    """The DDPM forward process matching the model's sampling scheduler (as the references)."""
    return DDPMScheduler.from_config(pipeline.scheduler.config)


def resolve_resolution(pipeline: StableDiffusionPipeline, resolution: int) -> int:
    """`resolution`, or the native size for 0; must survive the VAE's and UNet's downsampling."""
    native = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    multiple = pipeline.vae_scale_factor * 2 ** (len(pipeline.unet.config.block_out_channels) - 1)
    if resolution == 0:
        return native
    require(
        resolution > 0 and resolution % multiple == 0,
        f"resolution must be a positive multiple of {multiple} for this base model "
        f"(0 = its native {native}), got {resolution}",
    )
    return resolution


def add_token_embeddings(
    pipeline: StableDiffusionPipeline, embeddings: dict[str, torch.Tensor]
) -> None:
    """Adds tokens `{token: tensor[num_vectors, dim]}` with diffusers' `load_textual_inversion`,
    which names the vectors of a multi-vector token `<x>`, `<x>_1`, ..."""
    try:
        with seeded_global_rng(0):
            load_token_embeddings(pipeline, [{token: e} for token, e in embeddings.items()])
    except ValueError as err:
        raise SkindiffError(f"cannot add the tokens {', '.join(embeddings)}: {err}") from None


def token_ids(pipeline: StableDiffusionPipeline, token: str) -> list[int]:
    """Vocabulary ids of all vectors of `token`, in order."""
    expanded = pipeline.maybe_convert_prompt(token, pipeline.tokenizer).split()
    return pipeline.tokenizer.convert_tokens_to_ids(expanded)


def encode_captions(
    pipeline: StableDiffusionPipeline,
    text_encoder: torch.nn.Module,
    captions: list[str],
    device: torch.device,
) -> torch.Tensor:
    """Hidden states of `text_encoder` (the pipeline's, possibly wrapped for training) for
    captions, tokenized as the pipeline does at generation (multi-vector tokens expanded)."""
    tokenizer = pipeline.tokenizer
    ids = tokenizer(
        pipeline.maybe_convert_prompt(captions, tokenizer),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return text_encoder(ids.to(device))[0]


def place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    module.to(device)
    if module.dtype != dtype:  # casting warns even when nothing changes, so only when needed
        module.to(dtype=dtype)


def freeze(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    module.requires_grad_(False)
    module.eval()
    place(module, device, dtype)


# --- randomness of micro-batches ------------------------------------------------------------


@dataclass(frozen=True)
class MicroBatchDraws:
    """The seeded generators of the micro-batches a pass holds, one per `size` consecutive
    items. Each micro-batch draws from its own generator, in the same order whether it runs
    alone or joined with others (see `MicroBatchPasses`), so joining changes no draw."""

    generators: tuple[torch.Generator, ...]
    size: int

    def each(self, draw: Callable[[torch.Generator, slice], torch.Tensor]) -> torch.Tensor:
        """`draw(generator, items)` for every micro-batch (`items` slices its part of the
        pass), concatenated."""
        return torch.cat(
            [
                draw(generator, slice(i * self.size, (i + 1) * self.size))
                for i, generator in enumerate(self.generators)
            ]
        )


# --- what the frozen encoders make ---------------------------------------------------------

# Memory for remembered encodings, per process: at 512 px an image's latent distribution is
# 64 KiB in half precision, 128 KiB in float32, so this keeps 8,000 to 16,000 (the paper's runs
# see about 3,000).
ENCODING_CACHE_BYTES = 2**30
ENCODING_BATCH = 16  # images per VAE call when encoding a dataset's fixed images up front


class FrozenEncodings:
    """The frozen VAE's latent distribution of each augmented training image (keyed by the
    dataset's `key`: image, crop and flip) and, when the text encoder is frozen, each caption's
    hidden states: computed once, then remembered (up to ENCODING_CACHE_BYTES).

    A dataset's images with a fixed crop (`encode_fixed_images`) are encoded up front in batches
    of a fixed make-up; any other image and caption is encoded alone, when first drawn. So an
    encoding never depends on what was drawn before: a resumed run computes exactly what an
    uninterrupted one does. Against encoding every batch anew (the diffusers example scripts'
    way) only the batching of the encoders' arithmetic changes. The encoders run at their
    weights' dtype, autocast or not, as the reference scripts run them (there autocast wraps
    the trained model only): an encoding is the same whether made up front or in a step."""

    def __init__(self, vae: torch.nn.Module, text_encoder: torch.nn.Module | None = None):
        # Its convolutions run channels-last, as in generation: on a CPU 1.3-1.5x faster (tiny,
        # 16 images at 64 px), the latents the same to float rounding.
        self.vae = vae.to(memory_format=torch.channels_last)
        self.text_encoder = text_encoder
        self._latents: dict[str, torch.Tensor] = {}
        self._captions: dict[str, torch.Tensor] = {}
        self._bytes = 0

    def encode_fixed_images(
        self, dataset: ManifestImageDataset, draws: int, progress: bool = False
    ) -> None:
        """Encodes every image of `dataset` with a fixed crop up front, when the run's `draws`
        from it outnumber them (else drawing them costs less) and all fit in memory."""
        fixed = [entry for entry in dataset.fixed_images() if entry[0] not in self._latents]
        if not fixed or draws <= len(fixed):
            return
        vae = self.vae
        latent_side = dataset.resolution // (2 ** (len(vae.config.block_out_channels) - 1))
        size = 2 * vae.config.latent_channels * latent_side**2 * vae.dtype.itemsize
        if self._bytes + size * len(fixed) > ENCODING_CACHE_BYTES:
            return
        batches = range(0, len(fixed), ENCODING_BATCH)
        for start in tqdm(batches, desc="encoding images", unit="batch", disable=not progress):
            chunk = fixed[start : start + ENCODING_BATCH]
            pixels = torch.stack([dataset.fixed_image(row, flip) for _, row, flip in chunk])
            with torch.no_grad():
                moments = vae.encode(_vae_input(pixels, vae)).latent_dist.parameters
            for (key, _, _), value in zip(chunk, moments, strict=True):
                self._latents[key] = value[None].clone()
                self._bytes += size
        dataset.skip_pixels_of(frozenset(self._latents))

    def latents(
        self,
        pixel_values: Sequence[torch.Tensor | None],
        keys: list[str],
        draws: MicroBatchDraws,
    ) -> torch.Tensor:
        """Scaled latents of a pass, sampled from each image's distribution with its
        micro-batch's generator (one draw per micro-batch, as `latent_dist.sample` makes it).
        Pixels may be None where the key's encoding is remembered."""
        vae = self.vae
        with torch.no_grad(), _without_autocast(vae):
            moments = torch.cat(
                [
                    self._remembered(self._latents, key, lambda p=pixels: self._moments(p))
                    for pixels, key in zip(pixel_values, keys, strict=True)
                ]
            )
            latents = draws.each(
                lambda generator, items: DiagonalGaussianDistribution(moments[items]).sample(
                    generator
                )
            )
            return latents * vae.config.scaling_factor

    def _moments(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        return vae.encode(_vae_input(pixels[None], vae)).latent_dist.parameters

    def caption_states(
        self, pipeline: StableDiffusionPipeline, captions: list[str]
    ) -> torch.Tensor:
        """Hidden states of the frozen text encoder for captions."""
        encoder = self.text_encoder
        require(encoder is not None, "caption_states needs a frozen text encoder")
        with torch.no_grad(), _without_autocast(encoder):
            return torch.cat(
                [
                    self._remembered(
                        self._captions,
                        caption,
                        lambda c=caption: encode_captions(pipeline, encoder, [c], encoder.device),
                    )
                    for caption in captions
                ]
            )

    def _remembered(
        self, store: dict[str, torch.Tensor], key: str, compute: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        if key in store:
            return store[key]
        value = compute()
        size = value.numel() * value.element_size()
        if self._bytes + size <= ENCODING_CACHE_BYTES:
            store[key] = value
            self._bytes += size
        return value


def _without_autocast(module: torch.nn.Module) -> torch.autocast:
    return torch.autocast(module.device.type, enabled=False)


def _vae_input(pixels: torch.Tensor, vae: torch.nn.Module) -> torch.Tensor:
    return pixels.to(vae.device, vae.dtype, memory_format=torch.channels_last)


# --- the loss -------------------------------------------------------------------------------


def noise_prediction_loss(
    unet: torch.nn.Module,
    noise_scheduler: DDPMScheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    draws: MicroBatchDraws,
    snr_gamma: float = 0.0,
) -> torch.Tensor:
    """Denoising loss of a pass of scaled latents, averaged over its images: MSE between the
    UNet's prediction and the noise (epsilon) or the velocity (v_prediction); with `snr_gamma`
    > 0, Min-SNR-weighted per sample."""
    noise = draws.each(
        lambda generator, items: torch.randn(
            latents[items].shape, generator=generator, device=latents.device, dtype=latents.dtype
        )
    )
    timesteps = draws.each(
        lambda generator, items: torch.randint(
            0,
            noise_scheduler.config.num_train_timesteps,
            (len(latents[items]),),
            generator=generator,
            device=latents.device,
        )
    )
    # The forward process in float32 whatever the latents' dtype: the scheduler casts its
    # alphas_cumprod to that dtype, where bf16 rounds the first two (0.99915, 0.99830) to 1,
    # leaving timesteps 0 and 1 without noise and 2 with 1.5x its noise variance (fp16: up to
    # 15% off).
    noisy = noise_scheduler.add_noise(latents.float(), noise.float(), timesteps).to(latents.dtype)
    prediction = unet(noisy, timesteps, encoder_hidden_states.to(latents.dtype)).sample
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents.float(), noise.float(), timesteps)
    else:
        raise SkindiffError(f"the base model's prediction_type {prediction_type!r} is unsupported")
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none")
    per_sample = per_sample.mean(dim=list(range(1, per_sample.ndim)))
    if snr_gamma <= 0:
        return per_sample.mean()
    snr = compute_snr(noise_scheduler, timesteps)
    # Min-SNR-gamma (Hang et al. 2023): min(snr, gamma) / snr for epsilon; v-prediction's
    # target already carries a factor snr + 1.
    clipped = torch.clamp(snr, max=snr_gamma)
    weights = clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr
    return (per_sample * weights).mean()


# --- the loop -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoopSettings:
    max_train_steps: int
    train_batch_size: int
    gradient_accumulation_steps: int
    checkpoint_every: int
    max_grad_norm: float = 0.0  # 0 = no clipping
    micro_batch_passes: MicroBatchPasses = MicroBatchPasses.SEPARATE

    @classmethod
    def of(cls, config: object) -> "LoopSettings":
        """The loop settings of a stage config with fields of the same names."""
        return cls(
            **{f.name: getattr(config, f.name) for f in fields(cls) if hasattr(config, f.name)}
        )

    def draws_per_step(self, num_processes: int) -> int:
        """Images one optimizer step draws from each stream, over all processes."""
        return self.train_batch_size * self.gradient_accumulation_steps * num_processes

    def joins_micro_batches(self, device: torch.device) -> bool:
        if self.micro_batch_passes == MicroBatchPasses.AUTO:
            return device.type == "cpu"
        return self.micro_batch_passes == MicroBatchPasses.JOINED


# The mean loss of a pass: a batch of one or more micro-batches, with their generators.
StepLoss = Callable[[dict, MicroBatchDraws], torch.Tensor]


@dataclass(frozen=True)
class TrainingStream:
    """A seeded stream of training batches. Every optimizer step draws a full batch from each
    stream of a loop; their gradients add up before the step, so streams that train disjoint
    parameters (one token each) train exactly as separate runs would."""

    dataset: ManifestImageDataset
    seed: int  # of the noise and timesteps drawn for its batches


def make_accelerator(mixed_precision: Precision) -> Accelerator:
    process_state()  # a launch's processes on CPUs as one group, not each on its own
    return Accelerator(mixed_precision=str(resolve_mixed_precision(mixed_precision)))


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: param.detach().cpu().contiguous()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def _checkpoint_trainable_only(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Makes `save_state` / `load_state` carry only the trainable parameters of `model`
    (the frozen rest reloads from the base model), next to optimizer and scaler state."""

    def save(models: list, weights: list, output_dir: str) -> None:
        weights.clear()
        save_file(trainable_state(model), Path(output_dir) / TRAINABLE_FILE)

    def load(models: list, input_dir: str) -> None:
        models.clear()
        saved = load_file(Path(input_dir) / TRAINABLE_FILE)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def _checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first, as (step, folder)."""
    found = [
        (int(match.group(1)), path)
        for path in (out_dir / CHECKPOINTS).glob("step-*")
        if (match := _STEP_DIR.fullmatch(path.name)) and path.is_dir()
    ]
    return sorted(found)


def save_checkpoint(
    accelerator: Accelerator, out_dir: Path, step: int, losses: dict[str, list[float]]
) -> None:
    """Writes `checkpoints/step-<step>` atomically, then drops the older checkpoints."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (out_dir / CHECKPOINTS).mkdir(exist_ok=True)
        with atomic_directory(out_dir / CHECKPOINTS / f"step-{step}") as tmp:
            accelerator.save_state(str(tmp))
            (tmp / LOSSES_FILE).write_text(json.dumps(losses))
        for _, path in _checkpoints(out_dir)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()


def _loader_workers(device: torch.device) -> int:
    # On a CPU the workers would compete with the model for the same cores.
    return 0 if device.type == "cpu" else min(4, os.cpu_count() or 1)


def run_training_loop(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    streams: dict[str, TrainingStream],
    step_loss: StepLoss,
    settings: LoopSettings,
    out_dir: Path,
    *,
    learning_rate_option: str,
    after_step: Callable[[], None] | None = None,
    progress: bool = True,
    desc: str = "training",
) -> dict[str, list[float]]:
    """Trains `model` (prepared, with `optimizer`) for `settings.max_train_steps` optimizer steps
    and returns, per stream, one mean loss per step, resuming from the latest checkpoint in
    `out_dir`. A loss that is not finite stops it before its step's checkpoint, with one line
    naming `desc` (the stage), the step and the setting to change (`learning_rate_option`, the
    stage's learning-rate option, under full precision).

    Each step takes `settings.train_batch_size` x accumulation draws from every stream, in
    one pass per stream when micro-batches are joined, else one per micro-batch;
    `step_loss(batch, draws)` computes a pass's mean loss, and each pass is backpropagated
    alone, so memory holds one pass whatever the number of streams. `after_step` runs after
    every optimizer step (e.g. to restore parameters that must not move).
    """
    _checkpoint_trainable_only(accelerator, accelerator.unwrap_model(model))
    start, losses = 0, {name: [] for name in streams}
    checkpoints = _checkpoints(out_dir)
    if checkpoints:
        start, path = checkpoints[-1]
        log.info("%s: resuming from checkpoint %s", desc, path.name)
        accelerator.load_state(str(path))
        losses = json.loads((path / LOSSES_FILE).read_text())

    accumulation = settings.gradient_accumulation_steps
    per_step = settings.draws_per_step(accelerator.num_processes)
    # Micro-batches of each pass: all of a step's, or one.
    passes = (
        [range(accumulation)]
        if settings.joins_micro_batches(accelerator.device)
        else [range(micro, micro + 1) for micro in range(accumulation)]
    )
    batches = {}
    for name, stream in streams.items():
        loader = DataLoader(
            stream.dataset,
            batch_size=settings.train_batch_size * len(passes[0]),
            collate_fn=collate_draws,
            # Draws of the remaining steps only: a resumed run continues where it stopped.
            sampler=range(start * per_step, settings.max_train_steps * per_step),
            num_workers=_loader_workers(accelerator.device),
        )
        batches[name] = iter(accelerator.prepare(loader))
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    bar = tqdm(
        total=settings.max_train_steps,
        initial=start,
        desc=desc,
        disable=not progress or not accelerator.is_main_process,
    )
    for step in range(start, settings.max_train_steps):
        totals = {name: torch.zeros((), device=accelerator.device) for name in streams}
        for p, micros in enumerate(passes):
            for k, (name, stream) in enumerate(streams.items()):
                draws = MicroBatchDraws(
                    tuple(
                        seeded_generator(
                            "step",
                            stream.seed,
                            step,
                            micro,
                            accelerator.process_index,
                            device=accelerator.device,
                        )
                        for micro in micros
                    ),
                    settings.train_batch_size,
                )
                # Gradients are averaged across processes only on the step's last backward.
                syncing = p == len(passes) - 1 and k == len(streams) - 1
                with contextlib.nullcontext() if syncing else accelerator.no_sync(model):
                    with accelerator.autocast():
                        loss = step_loss(next(batches[name]), draws)
                    accelerator.backward(loss * len(micros) / accumulation)
                totals[name] += loss.detach().float() * len(micros)
        if settings.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        for name, total in totals.items():
            losses[name].append(accelerator.reduce(total / accumulation, reduction="mean").item())
        _check_finite_losses(
            {name: curve[-1] for name, curve in losses.items()},
            step + 1,
            settings.max_train_steps,
            Precision(accelerator.mixed_precision),
            desc,
            learning_rate_option,
        )
        bar.update()
        bar.set_postfix(loss=f"{sum(curve[-1] for curve in losses.values()) / len(losses):.4f}")
        done = step + 1
        if done % settings.checkpoint_every == 0 or done == settings.max_train_steps:
            save_checkpoint(accelerator, out_dir, done, losses)
    bar.close()
    return losses


def _check_finite_losses(
    step_losses: dict[str, float],
    step: int,
    max_train_steps: int,
    precision: Precision,
    stage: str,
    learning_rate_option: str,
) -> None:
    """Refuses a step whose mean loss (per stream) is NaN or inf. The losses are the floats the
    loop reads for its curve anyway, so the check adds no device sync; being the mean over all
    processes, they fail every process of a launch at the same step."""
    for name, loss in step_losses.items():
        if math.isfinite(loss):
            continue
        whose = f" of {name}" if len(step_losses) > 1 else ""
        remedy = non_finite_remedy(
            precision,
            f"lower {learning_rate_option}, or look for NaN or inf in the base model's weights",
        )
        raise SkindiffError(
            f"{stage}: the loss{whose} is not finite ({loss}) at step {step} of {max_train_steps} "
            f"{remedy}"
        )
