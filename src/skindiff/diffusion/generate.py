"""The `generate` stage: synthetic variants of every training image, with a target skin type.

Reproducibility is by construction, not by luck:
- every synthetic image has its own seed, derived from (config seed, source image, index), and
  its own `torch.Generator`, so it does not depend on which other images share its batch; a
  light source's target skin type is drawn once from (config seed, source image), so its
  variants share it, as the reference's variants of one prompt do;
- batches are fixed chunks of the plan order, so a resumed run computes each image in exactly
  the batch an uninterrupted run would have (batched CPU math is only bitwise stable that way),
  and so do the processes of a launch (`accelerate launch`, `torchrun`), which share the batches
  out: N processes write the same bytes as one;
- `run.json` in the output folder records what the images were made from; resuming with
  anything else is refused, so stale images are never mixed in.

What repeats is computed once (`BatchInputs`): each source image is encoded by the VAE once for
all its variants (each still samples its own latent from it with its own generator, as the
stock pipeline does), and each distinct prompt is encoded once. UNet and VAE run channels-last;
with `compile_unet` the UNet runs compiled by torch.compile (equal to float rounding).
Against the stock pipeline on the same batch the images differ only where the text encoder's
arithmetic depends on which prompts share its batch, and where the channels-last kernels round
differently (tested: mean absolute difference under 1/255).
"""

import hashlib
import io
import math
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image
from torch._dynamo.exc import BackendCompilerFailed
from tqdm.auto import tqdm

from skindiff.core.device import (
    non_finite_remedy,
    pick_device,
    resolve_mixed_precision,
    weight_dtype,
)
from skindiff.core.distributed import process_state
from skindiff.core.files import claim_folder, sha256_file, work_folder_lock, write_atomic
from skindiff.core.manifest import IMAGE_COLUMNS, require_columns, usable_as_file_name
from skindiff.core.seeding import derived_seed, image_seed
from skindiff.data.fitzpatrick import DARK_FST
from skindiff.data.images import load_rgb
from skindiff.diffusion.adapters import (
    embedding_files,
    embedding_width,
    load_lora,
    load_token_embeddings,
    lora_weights_file,
)
from skindiff.diffusion.base_model import base_model_fingerprint, resolve_base_model
from skindiff.diffusion.config import GenerateConfig, Pipeline, SchedulerName
from skindiff.diffusion.prompts import SKIN_TYPE_PHRASES, placeholder_token, skin_prompt
from skindiff.diffusion.skin_tone_check import measure_synthetic, replacements
from skindiff.errors import SkindiffError, require

# The scheduler classes of the named schedulers; DEFAULT keeps the base model's own.
SCHEDULERS = {
    SchedulerName.PNDM: PNDMScheduler,
    SchedulerName.DDIM: DDIMScheduler,
    SchedulerName.DPM_PLUS_PLUS: DPMSolverMultistepScheduler,
    SchedulerName.EULER: EulerDiscreteScheduler,
    SchedulerName.EULER_ANCESTRAL: EulerAncestralDiscreteScheduler,
}
# A synthetic image's row: the IMAGE_COLUMNS of the image, then where it came from and how.
MANIFEST_COLUMNS = (
    "md5hash",
    "index",
    "label",
    "fitzpatrick_scale",
    "group",
    "path",
    "source_fitzpatrick_scale",
    "source_group",
    "source_path",
    "prompt",
    "seed",
    "mode",
    "strength",
    "guidance_scale",
    "num_inference_steps",
    "scheduler",
    # its skin tone (skin_tone_check.py): whether it is on target, which try it is (0: the
    # planned seed; 1, 2, ...: replacements by skin_tone_filter) and whether classifiers use it
    "ita",
    "ita_category",
    "on_target",
    "attempt",
    "kept",
)
PLAN_COLUMNS = MANIFEST_COLUMNS[: MANIFEST_COLUMNS.index("ita")]
MANIFEST_FILE = "manifest.csv"
# Loads the pipeline (and gives its resolution) when first asked, then returns the same.
PipelineLoader = Callable[[], tuple[StableDiffusionPipeline | StableDiffusionImg2ImgPipeline, int]]
IMAGE_DIR = "images"
# Synthetic images are saved as the reference saves them: JPEG at PIL's default quality.
JPEG_QUALITY = 75
_JPEG_END = b"\xff\xd9"  # the end-of-image marker every complete JPEG ends with


def _check_train(train: pd.DataFrame) -> None:
    require_columns(train, IMAGE_COLUMNS, "train")
    if train.empty:
        raise SkindiffError("train has no rows: nothing to generate from")
    duplicated = train["md5hash"][train["md5hash"].duplicated()]
    if len(duplicated):
        raise SkindiffError(f"train has duplicate md5hash {duplicated.iloc[0]!r}")
    # md5hash names the output files, so it must not be able to leave the image folder.
    unsafe = [m for m in train["md5hash"] if not usable_as_file_name(str(m))]
    if unsafe:
        raise SkindiffError(f"train md5hash {unsafe[0]!r} is not usable as a file name")
    groups = set(train["group"]) - {"light", "dark"}
    if groups:
        raise SkindiffError(f"train group must be 'light' or 'dark', got {sorted(groups)}")
    types = set(train["fitzpatrick_scale"]) - set(SKIN_TYPE_PHRASES)
    if types:
        raise SkindiffError(f"train fitzpatrick_scale must be 1..6, got {sorted(types)}")


def plan_generation(config: GenerateConfig, train: pd.DataFrame) -> pd.DataFrame:
    """One row per synthetic image (the manifest without images); needs no model."""
    _check_train(train)
    rows = []
    for source in train.itertuples(index=False):
        concept = placeholder_token(source.label) if config.uses_ti else source.label
        if source.group == "light":
            target = _light_source_target(config, source.md5hash)
        else:
            target = int(source.fitzpatrick_scale)
        for k in range(config.num_per_image):
            seed = image_seed(config.seed, source.md5hash, k)
            rows.append(
                {
                    "md5hash": source.md5hash,
                    "index": k,
                    "label": source.label,
                    "fitzpatrick_scale": target,
                    "group": "dark" if target in DARK_FST else "light",
                    "path": f"{IMAGE_DIR}/{source.md5hash}-{k}.jpg",
                    "source_fitzpatrick_scale": int(source.fitzpatrick_scale),
                    "source_group": source.group,
                    "source_path": str(source.path),
                    "prompt": skin_prompt(concept, target),
                    "seed": seed,
                }
            )
    return pd.DataFrame(rows).assign(
        mode=config.mode,
        # strength means nothing to txt2img; an empty cell says so.
        strength=config.strength if config.pipeline == Pipeline.IMG2IMG else np.nan,
        guidance_scale=config.guidance_scale,
        num_inference_steps=config.num_inference_steps,
        scheduler=config.scheduler,
    )[list(PLAN_COLUMNS)]


def _light_source_target(config: GenerateConfig, md5hash: str) -> int:
    """The skin type all variants of a light source move to: one of `target_fst`, drawn from a
    stream of the source's own (its first variant's seed names the source)."""
    seed = derived_seed("target-fst", image_seed(config.seed, md5hash, 0))
    return int(np.random.default_rng(seed).choice(config.target_fst))


def _save_image(image: Image.Image, path: Path) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    write_atomic(path, buffer.getvalue())


def _is_complete(path: Path, size: int) -> bool:
    """Whether `path` is a whole JPEG of size x size RGB pixels that decodes fully."""
    try:
        data = path.read_bytes()
        if not data.endswith(_JPEG_END):
            return False
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.size == (size, size) and image.mode == "RGB"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def adapter_files(
    config: GenerateConfig,
    embeddings_dir: Path | None,
    lora_weights: Path | None,
    labels: Collection[str] = (),
) -> tuple[dict[Path, str], Path | None]:
    """The embedding files (with their tokens) and the LoRA file that `config.mode` uses; every
    one of `labels` must have a token."""
    tokens = [placeholder_token(label) for label in labels]
    embeddings = embedding_files(embeddings_dir, tokens) if config.uses_ti else {}
    lora_file = lora_weights_file(lora_weights) if config.uses_lora else None
    return embeddings, lora_file


def load_pipeline(
    config: GenerateConfig, embeddings: dict[Path, str], lora_file: Path | None
) -> tuple[StableDiffusionPipeline | StableDiffusionImg2ImgPipeline, int]:
    """The base pipeline with the mode's adapters, on the device, without a safety checker;
    and the resolution it generates at."""
    dtype = weight_dtype(resolve_mixed_precision(config.mixed_precision))
    pipe = StableDiffusionPipeline.from_pretrained(
        resolve_base_model(config.base_model),
        dtype=dtype,
        safety_checker=None,
        requires_safety_checker=False,
    )
    if embeddings:
        width = pipe.text_encoder.get_input_embeddings().weight.shape[-1]
        for path in embeddings:
            require(
                embedding_width(path) == width,
                f"embedding file {path} has width {embedding_width(path)}, base_model "
                f"expects {width}",
            )
        load_token_embeddings(pipe, [str(path) for path in embeddings])
    if lora_file is not None:
        try:
            load_lora(pipe, lora_file)
        except (ValueError, RuntimeError, KeyError) as err:
            raise SkindiffError(
                f"lora_weights {lora_file} do not fit the base_model: {err}"
            ) from err
        # Fused weights cost nothing extra per step, unlike an active adapter; unloading it
        # then drops its wrapper layers and keeps the fused weights.
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    if config.scheduler in SCHEDULERS:
        pipe.scheduler = SCHEDULERS[config.scheduler].from_config(pipe.scheduler.config)
    if config.pipeline == Pipeline.IMG2IMG:
        pipe = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    resolution = config.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    pipe = pipe.to(pick_device())
    # Convolutions run faster on channels-last tensors (CPU: measured 1.3x for the UNet).
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    if config.compile_unet:
        pipe.unet.compile()  # in place: the pipeline still sees a UNet2DConditionModel
    return pipe, resolution


def _source_image(path: str, resolution: int) -> Image.Image:
    try:
        rgb = load_rgb(Path(path))
    except (OSError, SyntaxError, ValueError) as err:
        raise SkindiffError(f"source image {path} cannot be read: {err}") from err
    # Bilinear, as the reference resizes its img2img sources.
    return rgb.resize((resolution, resolution), Image.Resampling.BILINEAR)


def generate_synthetic(
    config: GenerateConfig,
    train: pd.DataFrame,
    out_dir: Path,
    embeddings_dir: Path | None = None,
    lora_weights: Path | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Generates `config.num_per_image` images per training row into `out_dir/images`, and
    measures their skin tone; with `skin_tone_filter`, off-target images are replaced (see
    skin_tone_check.py) in rounds, each a plan of its own.

    Writes `out_dir/manifest.csv` (returned too; `path` relative to `out_dir`). Running again
    with the same out_dir only makes what is missing or broken; a process that finds another
    one generating there waits for it, then finds its images made.
    """
    out_dir = Path(out_dir)
    plan = plan_generation(config, train)
    labels = sorted(set(train["label"]))
    embeddings, lora_file = adapter_files(config, embeddings_dir, lora_weights, labels)
    model_dir = resolve_base_model(config.base_model)
    precision = resolve_mixed_precision(config.mixed_precision)
    fingerprint = asdict(config) | {
        "target_fst": [int(fst) for fst in config.target_fst],
        "mixed_precision": precision,
        "base_model_fingerprint": base_model_fingerprint(model_dir),
        "embeddings": {path.name: sha256_file(path) for path in embeddings},
        "lora_weights": sha256_file(lora_file) if lora_file else None,
        "plan_sha256": hashlib.sha256(plan.to_csv(index=False).encode()).hexdigest(),
    }
    state = process_state()
    # In a launch the main process holds the folder for all of them.
    with work_folder_lock(out_dir) if state.is_main_process else nullcontext():
        if state.is_main_process:
            claim_folder(out_dir, fingerprint)
            (out_dir / IMAGE_DIR).mkdir(exist_ok=True)
        state.wait_for_everyone()
        progress = progress and state.is_main_process
        pipeline = cache(lambda: load_pipeline(config, embeddings, lora_file))
        _make_images(config, plan, out_dir, pipeline, progress, "generating")
        chosen = measure_synthetic(plan.assign(attempt=0), out_dir, config)
        retries = config.skin_tone_retries if config.skin_tone_filter else 0
        for attempt in range(1, retries + 1):
            off_target = chosen[~chosen["on_target"].astype(bool)]
            if off_target.empty:
                break
            candidates = replacements(off_target, attempt)
            desc = f"replacing off-target images, try {attempt}"
            _make_images(config, candidates, out_dir, pipeline, progress, desc)
            replaced = measure_synthetic(candidates, out_dir, config)
            chosen = pd.concat([chosen.drop(index=replaced.index), replaced]).sort_index()
        manifest = chosen.assign(
            kept=chosen["on_target"] if config.skin_tone_filter else True
        ).astype({"on_target": bool, "attempt": int})[list(MANIFEST_COLUMNS)]
        if state.is_main_process:
            write_atomic(out_dir / MANIFEST_FILE, manifest.to_csv(index=False).encode())
    return manifest


def _make_images(
    config: GenerateConfig,
    plan: pd.DataFrame,
    out_dir: Path,
    pipeline: PipelineLoader,
    progress: bool,
    desc: str,
) -> None:
    """Makes the images of `plan` that are missing or broken; a launch's processes share the
    batches out."""
    state = process_state()
    todo = _unfinished_batches(plan, out_dir, config)
    state.wait_for_everyone()  # every process has its list before any image is written
    mine = todo[state.process_index :: state.num_processes]
    if mine:
        _generate_missing(config, plan, mine, out_dir, pipeline, progress, desc)
    state.wait_for_everyone()


def _generate_missing(
    config: GenerateConfig,
    plan: pd.DataFrame,
    todo: list[tuple[pd.DataFrame, set[int]]],
    out_dir: Path,
    pipeline: PipelineLoader,
    progress: bool,
    desc: str,
) -> None:
    pipe, resolution = pipeline()
    inputs = BatchInputs(pipe, config, resolution)
    with tqdm(
        total=sum(len(missing) for _, missing in todo),
        desc=desc,
        unit="img",
        disable=not progress,
    ) as bar:
        for chunk, missing in todo:
            images = generate_batch(pipe, config, chunk, resolution, inputs)
            for i, image in zip(chunk.index, images, strict=True):
                if i in missing:
                    _save_image(image, out_dir / plan.at[i, "path"])
            bar.update(len(missing))


def _unfinished_batches(
    plan: pd.DataFrame, out_dir: Path, config: GenerateConfig
) -> list[tuple[pd.DataFrame, set[int]]]:
    """The fixed batches of the plan that lack a complete image, with the rows to (re)write."""
    todo = []
    for start in range(0, len(plan), config.generation_batch_size):
        chunk = plan.iloc[start : start + config.generation_batch_size]
        missing = {
            i
            for i, path in zip(chunk.index, chunk["path"], strict=True)
            if not _is_complete(out_dir / path, config.output_size)
        }
        if missing:
            todo.append((chunk, missing))
    return todo


class BatchInputs:
    """The pipeline inputs that repeat across a plan's batches, each computed once: a prompt's
    text embeddings, a source image's latent distribution (kept for the batch after its first,
    as the plan lists a source's variants together)."""

    def __init__(
        self,
        pipe: StableDiffusionPipeline | StableDiffusionImg2ImgPipeline,
        config: GenerateConfig,
        resolution: int,
    ):
        self.pipe = pipe
        self.resolution = resolution
        self.guided = config.guidance_scale > 1
        self._prompts: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._sources: dict[str, DiagonalGaussianDistribution] = {}

    def prompt_embeds(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The pipeline's `prompt_embeds` (and `negative_prompt_embeds`) for a batch."""
        for prompt in set(prompts) - set(self._prompts):
            self._prompts[prompt] = self.pipe.encode_prompt(
                prompt, self.pipe.device, 1, self.guided
            )
        embeds = {"prompt_embeds": torch.cat([self._prompts[p][0] for p in prompts])}
        if self.guided:
            embeds["negative_prompt_embeds"] = torch.cat([self._prompts[p][1] for p in prompts])
        return embeds

    def source_latents(self, paths: list[str], generators: list[torch.Generator]) -> torch.Tensor:
        """Scaled img2img start latents, one per (source path, generator), drawn as the stock
        pipeline draws them (each source encoded alone; its generator samples the latent)."""
        vae = self.pipe.vae
        known = self._sources
        self._sources = {}
        for path in paths:
            if path not in self._sources:
                self._sources[path] = known[path] if path in known else self._encode(path)
        samples = [self._sources[p].sample(g) for p, g in zip(paths, generators, strict=True)]
        return vae.config.scaling_factor * torch.cat(samples)

    def _encode(self, path: str) -> DiagonalGaussianDistribution:
        image = self.pipe.image_processor.preprocess(_source_image(path, self.resolution))
        vae = self.pipe.vae
        return vae.encode(image.to(vae.device, vae.dtype)).latent_dist


def generate_batch(
    pipe: StableDiffusionPipeline | StableDiffusionImg2ImgPipeline,
    config: GenerateConfig,
    chunk: pd.DataFrame,
    resolution: int,
    inputs: BatchInputs | None = None,
) -> list[Image.Image]:
    """The images of plan rows (`prompt`, `seed`, img2img: `source_path`) at `output_size`;
    `inputs` carries what earlier batches computed.

    Callers pass fixed chunks of their plan: CPU results are bitwise stable only per batch."""
    inputs = inputs or BatchInputs(pipe, config, resolution)
    # CPU generators give the same noise on every device.
    generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in chunk["seed"]]
    watch = NonFiniteWatch()
    common = inputs.prompt_embeds(list(chunk["prompt"])) | {
        "num_inference_steps": config.num_inference_steps,
        "guidance_scale": config.guidance_scale,
        "generator": generators,
        "callback_on_step_end": watch.after_step,
        # Images as floats, to be checked before they become pixels (NaN would become black).
        "output_type": "np",
    }
    with torch.inference_mode(), _explained_compile_failure(config), watch.decoding(pipe.vae):
        if config.pipeline == Pipeline.IMG2IMG:
            latents = inputs.source_latents(list(chunk["source_path"]), generators)
            watch.note("latents", "the VAE encode of the source images", latents)
            images = pipe(image=latents, strength=config.strength, **common).images
        else:
            images = pipe(height=resolution, width=resolution, **common).images
    found = watch.first_non_finite()
    if found is not None:
        what, where, peak = found
        remedy = non_finite_remedy(
            resolve_mixed_precision(config.mixed_precision),
            "look for NaN or inf in the base model's weights and in the adapters (Textual "
            "Inversion embeddings, LoRA weights)",
        )
        raise SkindiffError(
            f"generate: the {what} are not finite ({peak}) at {where}, in a batch of "
            f"{len(chunk)} images, the first from {chunk['source_path'].iloc[0]}, {remedy}"
        )
    # Bicubic: the reference resizes its outputs with PIL's default filter, which is bicubic.
    return [
        image.resize((config.output_size,) * 2, Image.Resampling.BICUBIC)
        for image in pipe.image_processor.numpy_to_pil(images)
    ]


class NonFiniteWatch:
    """Watches a batch's generation for NaN and inf: the largest magnitude of the img2img start
    latents, of the latents after each denoising step and of the VAE's decoded images stays on
    the device until the batch is done, then all are read at once. Checking each step as it
    ends would make the host wait for the device at every step; one read per batch costs one
    wait, and names the step all the same (a batch that went non-finite is lost either way)."""

    def __init__(self) -> None:
        self._peaks: list[tuple[str, str, torch.Tensor]] = []  # (what, where, peak)

    def note(self, what: str, where: str, values: torch.Tensor) -> None:
        self._peaks.append((what, where, values.detach().abs().amax()))

    def after_step(
        self,
        pipe: StableDiffusionPipeline | StableDiffusionImg2ImgPipeline,
        step: int,
        timestep: torch.Tensor,
        outputs: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """A diffusers `callback_on_step_end`."""
        where = f"denoising step {step + 1} of {pipe.num_timesteps}"
        self.note("latents", where, outputs["latents"])
        return outputs

    @contextmanager
    def decoding(self, vae: torch.nn.Module) -> Iterator[None]:
        """Notes the VAE decoder's output in the block: before the pipeline clamps it to
        [0, 1], where an inf would pass as white."""
        hook = vae.decoder.register_forward_hook(
            lambda module, inputs, output: self.note("images", "the VAE decode", output)
        )
        try:
            yield
        finally:
            hook.remove()

    def first_non_finite(self) -> tuple[str, str, float] | None:
        """(what, where, its peak: nan or inf) of the first value noted that is not finite."""
        if not self._peaks:
            return None
        peaks = torch.stack([peak.float() for _, _, peak in self._peaks]).tolist()
        for (what, where, _), peak in zip(self._peaks, peaks, strict=True):
            if not math.isfinite(peak):
                return what, where, peak
        return None


@contextmanager
def _explained_compile_failure(config: GenerateConfig) -> Iterator[None]:
    """torch.compile fails on the UNet's first call (no C++ compiler, an unsupported setup):
    one line that says so, instead of the compiler's output."""
    try:
        yield
    except BackendCompilerFailed as err:  # inductor's own errors derive from it
        if not config.compile_unet:
            raise
        reason = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise SkindiffError(
            f"compile_unet: torch.compile could not compile the UNet ({reason.strip()[:200]}); "
            "generate with compile_unet false"
        ) from err
