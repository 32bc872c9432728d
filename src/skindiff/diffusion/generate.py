"""The `generate` stage: synthetic variants of every training image, with a target skin type.

Reproducibility is by construction, not by luck:
- every synthetic image has its own seed, derived from (config seed, source image, index), and
  its own `torch.Generator`, so it does not depend on which other images share its batch;
- batches are fixed chunks of the plan order, so a resumed run computes each image in exactly
  the batch an uninterrupted run would have (batched CPU math is only bitwise stable that way);
- `config.json` in the output folder records what the images were made from; resuming with
  anything else is refused, so stale images are never mixed in.
"""

import hashlib
import io
import json
import os
import re
from collections.abc import Collection
from dataclasses import asdict, dataclass
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
from PIL import Image
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from skindiff.data.fitzpatrick import DARK_FST
from skindiff.data.images import load_rgb
from skindiff.diffusion.base_model import base_model_fingerprint, resolve_base_model
from skindiff.diffusion.device import pick_device, resolve_mixed_precision, weight_dtype
from skindiff.diffusion.prompts import SKIN_TYPE_PHRASES, placeholder_token, skin_prompt
from skindiff.errors import SkindiffError

MODES = (
    "img2img/ti+lora",
    "img2img/ti",
    "img2img/lora",
    "img2img/vanilla",
    "txt2img/ti",
    "txt2img/vanilla",
)
# "default" keeps the base model's own scheduler (PNDM for SD 2.1 base).
SCHEDULERS = {
    "default": None,
    "pndm": PNDMScheduler,
    "ddim": DDIMScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
}
TRAIN_COLUMNS = ("md5hash", "label", "fitzpatrick_scale", "group", "path")
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
)
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.csv"
IMAGE_DIR = "images"
LORA_FILE = "pytorch_lora_weights.safetensors"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the empty IEND chunk every complete PNG ends with


@dataclass(frozen=True)
class GenerateConfig:
    """Settings of the `generate` stage; defaults are the reference img2img settings."""

    base_model: str = "tiny"
    mode: str = "img2img/ti+lora"  # pipeline / adapters; vanilla = base model, condition in words
    num_per_image: int = 5
    strength: float = 0.5
    guidance_scale: float = 2.0
    num_inference_steps: int = 100
    scheduler: str = "default"
    resolution: int = 0  # 0 = the model's native size
    output_size: int = 256
    generation_batch_size: int = 8
    target_fst: tuple[int, ...] = DARK_FST  # light sources get one of these, drawn per image
    mixed_precision: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        # Configs also come back from JSON and command lines, where tuples become lists.
        object.__setattr__(self, "target_fst", tuple(self.target_fst))
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.scheduler not in SCHEDULERS:
            problems.append(
                f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}"
            )
        if self.pipeline == "img2img" and not 0 < self.strength <= 1:
            problems.append(f"strength must be in (0, 1] for img2img, got {self.strength}")
        elif self.pipeline == "img2img" and int(self.strength * self.num_inference_steps) < 1:
            problems.append(
                f"strength x num_inference_steps must give at least one denoising step, got "
                f"{self.strength} x {self.num_inference_steps}"
            )
        for name in (
            "num_per_image",
            "num_inference_steps",
            "generation_batch_size",
            "output_size",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.resolution < 0 or self.resolution % 8:
            problems.append(
                f"resolution must be 0 (native) or a positive multiple of 8, got {self.resolution}"
            )
        if not self.target_fst or any(fst not in SKIN_TYPE_PHRASES for fst in self.target_fst):
            problems.append(f"target_fst must be Fitzpatrick types 1..6, got {self.target_fst}")
        if problems:
            raise SkindiffError("; ".join(problems))

    @property
    def pipeline(self) -> str:
        return self.mode.split("/")[0]

    @property
    def uses_ti(self) -> bool:
        return "ti" in self.mode.split("/")[1].split("+")

    @property
    def uses_lora(self) -> bool:
        return "lora" in self.mode.split("/")[1].split("+")


def image_seed(seed: int, md5hash: str, index: int) -> int:
    """Seed of one synthetic image: a stable 63-bit hash (Python's hash() varies per process)."""
    digest = hashlib.sha256(f"{seed}/{md5hash}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _check_train(train: pd.DataFrame) -> None:
    missing = [column for column in TRAIN_COLUMNS if column not in train.columns]
    if missing:
        raise SkindiffError(f"train lacks the manifest column(s) {', '.join(missing)}")
    if train.empty:
        raise SkindiffError("train has no rows: nothing to generate from")
    duplicated = train["md5hash"][train["md5hash"].duplicated()]
    if len(duplicated):
        raise SkindiffError(f"train has duplicate md5hash {duplicated.iloc[0]!r}")
    # md5hash names the output files, so it must not be able to leave the image folder.
    unsafe = [m for m in train["md5hash"] if not re.fullmatch(r"[0-9A-Za-z_-]+", str(m))]
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
        for k in range(config.num_per_image):
            seed = image_seed(config.seed, source.md5hash, k)
            if source.group == "light":
                target = int(np.random.default_rng(seed).choice(config.target_fst))
            else:
                target = int(source.fitzpatrick_scale)
            rows.append(
                {
                    "md5hash": source.md5hash,
                    "index": k,
                    "label": source.label,
                    "fitzpatrick_scale": target,
                    "group": "dark" if target in DARK_FST else "light",
                    "path": f"{IMAGE_DIR}/{source.md5hash}-{k}.png",
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
        strength=config.strength if config.pipeline == "img2img" else np.nan,
        guidance_scale=config.guidance_scale,
        num_inference_steps=config.num_inference_steps,
        scheduler=config.scheduler,
    )[list(MANIFEST_COLUMNS)]


def _embedding_files(embeddings_dir: Path | None, labels: Collection[str]) -> dict[Path, str]:
    """Each embedding file of `embeddings_dir` with its token; every label's token must be there."""
    if embeddings_dir is None or not Path(embeddings_dir).is_dir():
        raise SkindiffError(f"embeddings_dir {embeddings_dir} is not a folder of embeddings")
    files = {}
    for path in sorted(Path(embeddings_dir).glob("*.safetensors")):
        try:
            with safe_open(path, "pt") as handle:
                keys = list(handle.keys())
        except (OSError, SafetensorError) as err:
            raise SkindiffError(f"embedding file {path} is not readable: {err}") from err
        if len(keys) != 1:
            raise SkindiffError(f"embedding file {path} must hold one token, holds {keys}")
        files[path] = keys[0]
    missing = sorted({placeholder_token(label) for label in labels} - set(files.values()))
    if missing:
        raise SkindiffError(
            f"embeddings_dir {embeddings_dir} has no embedding for {', '.join(missing)}"
        )
    return files


def _lora_file(lora_weights: Path | None) -> Path:
    """The LoRA weight file: `lora_weights` itself or its pytorch_lora_weights.safetensors."""
    path = Path(lora_weights) if lora_weights is not None else None
    if path is not None and path.is_dir():
        path = path / LORA_FILE
    if path is None or not path.is_file():
        raise SkindiffError(f"lora_weights {path} not found (a {LORA_FILE} or its folder)")
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _claim_out_dir(out_dir: Path, fingerprint: dict) -> None:
    """Starts a new output folder, or checks that an existing one was made the same way."""
    record = out_dir / CONFIG_FILE
    if record.is_file():
        previous = json.loads(record.read_text())
        changed = sorted(
            k for k in fingerprint.keys() | previous.keys() if fingerprint.get(k) != previous.get(k)
        )
        if changed:
            raise SkindiffError(
                f"out_dir {out_dir} holds images made with different settings or inputs "
                f"({', '.join(changed)}); "
                "use a new out_dir (or delete this one) rather than mixing them"
            )
        return
    if out_dir.exists() and any(out_dir.iterdir()):
        raise SkindiffError(f"out_dir {out_dir} is not empty and holds no {CONFIG_FILE}")
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(record, json.dumps(fingerprint, indent=2, sort_keys=True).encode())


def _write_atomic(path: Path, data: bytes) -> None:
    # A kill leaves at most the temporary file, which the next run overwrites. No fsync: a file
    # lost to a power cut comes back empty or short, and resuming regenerates such files.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _save_png(image: Image.Image, path: Path) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    _write_atomic(path, buffer.getvalue())


def _is_complete(path: Path, size: int) -> bool:
    """Whether `path` is a whole PNG of size x size pixels that decodes fully."""
    try:
        data = path.read_bytes()
        if not data.endswith(_PNG_END):
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
    embeddings = _embedding_files(embeddings_dir, labels) if config.uses_ti else {}
    lora_file = _lora_file(lora_weights) if config.uses_lora else None
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
            with safe_open(path, "pt") as handle:
                shape = handle.get_slice(handle.keys()[0]).get_shape()
            if shape[-1] != width:
                raise SkindiffError(
                    f"embedding file {path} has width {shape[-1]}, base_model expects {width}"
                )
        pipe.load_textual_inversion([str(path) for path in embeddings])
    if lora_file is not None:
        try:
            pipe.load_lora_weights(str(lora_file))
        except (ValueError, RuntimeError, KeyError) as err:
            raise SkindiffError(
                f"lora_weights {lora_file} do not fit the base_model: {err}"
            ) from err
        # Fused weights cost nothing extra per step, unlike an active adapter.
        pipe.fuse_lora()
    if SCHEDULERS[config.scheduler] is not None:
        pipe.scheduler = SCHEDULERS[config.scheduler].from_config(pipe.scheduler.config)
    if config.pipeline == "img2img":
        pipe = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    resolution = config.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    return pipe.to(pick_device()), resolution


def _source_image(path: str, resolution: int) -> Image.Image:
    try:
        rgb = load_rgb(Path(path))
    except (OSError, SyntaxError, ValueError) as err:
        raise SkindiffError(f"source image {path} cannot be read: {err}") from err
    return rgb.resize((resolution, resolution), Image.Resampling.BICUBIC)


def generate_synthetic(
    config: GenerateConfig,
    train: pd.DataFrame,
    out_dir: Path,
    embeddings_dir: Path | None = None,
    lora_weights: Path | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Generates `config.num_per_image` images per training row into `out_dir/images`.

    Writes `out_dir/manifest.csv` (returned too; `path` relative to `out_dir`). Running again
    with the same out_dir only makes what is missing or broken.
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
        "embeddings": {path.name: _sha256(path) for path in embeddings},
        "lora_weights": _sha256(lora_file) if lora_file else None,
        "plan_sha256": hashlib.sha256(plan.to_csv(index=False).encode()).hexdigest(),
    }
    _claim_out_dir(out_dir, fingerprint)
    (out_dir / IMAGE_DIR).mkdir(exist_ok=True)

    todo = _unfinished_batches(plan, out_dir, config)
    if todo:
        pipe, resolution = load_pipeline(config, embeddings, lora_file)
        done = len(plan) - sum(len(missing) for _, missing in todo)
        with tqdm(
            total=len(plan), initial=done, desc="generating", unit="img", disable=not progress
        ) as bar:
            for chunk, missing in todo:
                images = generate_batch(pipe, config, chunk, resolution)
                for i, image in zip(chunk.index, images, strict=True):
                    if i in missing:
                        _save_png(image, out_dir / plan.at[i, "path"])
                bar.update(len(missing))
    _write_atomic(out_dir / MANIFEST_FILE, plan.to_csv(index=False).encode())
    return plan


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


def generate_batch(
    pipe: StableDiffusionPipeline | StableDiffusionImg2ImgPipeline,
    config: GenerateConfig,
    chunk: pd.DataFrame,
    resolution: int,
) -> list[Image.Image]:
    """The images of plan rows (`prompt`, `seed`, img2img: `source_path`) at `output_size`.

    Callers pass fixed chunks of their plan: CPU results are bitwise stable only per batch."""
    images = _generate_batch(pipe, config, chunk, resolution)
    return [image.resize((config.output_size,) * 2, Image.Resampling.BICUBIC) for image in images]


def _generate_batch(
    pipe: StableDiffusionPipeline | StableDiffusionImg2ImgPipeline,
    config: GenerateConfig,
    chunk: pd.DataFrame,
    resolution: int,
) -> list[Image.Image]:
    # CPU generators give the same noise on every device.
    generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in chunk["seed"]]
    common = {
        "prompt": list(chunk["prompt"]),
        "num_inference_steps": config.num_inference_steps,
        "guidance_scale": config.guidance_scale,
        "generator": generators,
    }
    if config.pipeline == "img2img":
        sources = [_source_image(path, resolution) for path in chunk["source_path"]]
        return pipe(image=sources, strength=config.strength, **common).images
    return pipe(height=resolution, width=resolution, **common).images
