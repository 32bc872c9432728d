"""Base Stable Diffusion models: a hub id, a local diffusers folder, or a built-in one.

Every base model is a normal diffusers folder, so every stage loads it the same way
(`from_pretrained`). The built-in ones need no download:
- `tiny`: an SD-2-style stack small enough for every stage to run in seconds on a CPU,
  pretrained by `skindiff pretrain-base` on a procedural skin corpus and shipped in the package;
- `tiny-random`: the same architecture with random weights (what the pretraining starts from);
- `sd21-random`: the full Stable Diffusion 2.1-base architecture with random weights, to measure
  speed and memory at real scale without downloading the weights.
Random-weight models are made offline from configs and saved once in the cache.
"""

import hashlib
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from skindiff.core.files import cache_dir, cached_directory
from skindiff.diffusion.tokenizer import MAX_LENGTH, build_offline_tokenizer
from skindiff.errors import SkindiffError

DEFAULT_HUB_ID = "stabilityai/stable-diffusion-2-1-base"
BUILTIN_VERSION = 3  # bump when a built-in config changes, so cached copies are rebuilt
# Files of a diffusers SD folder; the hub repo also holds .ckpt files we never need.
HUB_PATTERNS = ["*.json", "*.txt", "*/diffusion_pytorch_model.safetensors", "*/model.safetensors"]

# Stable Diffusion 2.1 base's scheduler (PNDM, scaled-linear betas, epsilon prediction).
SD21_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

BUILTIN_CONFIGS = {
    "tiny-random": {
        "unet": {
            "sample_size": 16,
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "attention_head_dim": (2, 4),
            "cross_attention_dim": 32,
            "use_linear_projection": True,
            "norm_num_groups": 8,  # as the autoencoder's, below
        },
        "vae": {
            "sample_size": 64,
            "block_out_channels": (32, 64, 64),
            "layers_per_block": 1,
            "down_block_types": ("DownEncoderBlock2D",) * 3,
            "up_block_types": ("UpDecoderBlock2D",) * 3,
            "latent_channels": 4,
            # 32 groups of 32 channels would normalise each channel on its own, erasing the
            # image's colour at every layer; groups of 4 channels keep it.
            "norm_num_groups": 8,
        },
        "text_encoder": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "projection_dim": 32,
        },
    },
    "sd21-random": {
        "unet": {
            "sample_size": 64,
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "attention_head_dim": (5, 10, 20, 20),
            "cross_attention_dim": 1024,
            "use_linear_projection": True,
        },
        "vae": {
            "sample_size": 512,
            "block_out_channels": (128, 256, 512, 512),
            "layers_per_block": 2,
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "latent_channels": 4,
        },
        "text_encoder": {  # OpenCLIP ViT-H text tower, 23 of its 24 layers as SD 2 uses them
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 23,
            "num_attention_heads": 16,
            "projection_dim": 512,
            "vocab_size": 49408,
        },
    },
}


# Built-in pretrained models, shipped in the package as diffusers folders.
PRETRAINED_DIR = Path(__file__).parent / "pretrained"
PRETRAINED_MODELS = {"tiny": PRETRAINED_DIR / "tiny"}


def build_builtin_pipeline(name: str, seed: int = 0) -> StableDiffusionPipeline:
    """A random-weight SD pipeline of a built-in config; the same seed gives the same weights."""
    config = BUILTIN_CONFIGS[name]
    tokenizer = build_offline_tokenizer()
    text_config = {"vocab_size": len(tokenizer)} | config["text_encoder"]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **config["unet"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, **config["vae"])
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            max_position_embeddings=MAX_LENGTH,
            hidden_act="gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **text_config,
        )
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(**SD21_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _builtin_dir(name: str) -> Path:
    def build(folder: Path) -> None:
        build_builtin_pipeline(name).save_pretrained(folder, safe_serialization=True)

    return cached_directory(cache_dir() / "models" / f"{name}-v{BUILTIN_VERSION}", build)


def _hub_dir(hub_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(hub_id, allow_patterns=HUB_PATTERNS))
    except Exception as err:  # the hub client raises many types for "not reachable / not found"
        raise SkindiffError(
            f"base_model {hub_id!r} is neither a local folder nor reachable on the model hub "
            f"({type(err).__name__}). Download it where the hub is reachable, e.g. "
            f"`hf download {hub_id} --local-dir DIR`, and pass base_model=DIR"
        ) from None


def resolve_base_model(base_model: str) -> Path:
    """Local diffusers folder of `base_model`: a built-in name, a folder, or a hub id."""
    if not base_model:
        raise SkindiffError(f"base_model is empty: use 'tiny', a folder or e.g. {DEFAULT_HUB_ID!r}")
    if base_model in PRETRAINED_MODELS:
        folder = PRETRAINED_MODELS[base_model]
        if not (folder / "model_index.json").is_file():
            raise SkindiffError(
                f"the built-in {base_model!r} model is missing from {folder}: reinstall skindiff "
                f"from a complete checkout, or rebuild it with `skindiff pretrain-base`"
            )
        return folder
    if base_model in BUILTIN_CONFIGS:
        return _builtin_dir(base_model)
    local = Path(base_model).expanduser()
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise SkindiffError(
                f"base_model {local} is not a diffusers folder (no model_index.json)"
            )
        return local
    return _hub_dir(base_model)


def base_model_fingerprint(folder: Path) -> str:
    """Identity of a diffusers folder for cache keys: its configs and weight file sizes.

    Hashing gigabytes of weights on every stage would cost more than the stages it saves;
    configs plus exact sizes tell apart any two checkpoints one would mix up in practice.
    """
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        digest.update(str(path.relative_to(folder)).encode())
        if path.suffix == ".json":
            digest.update(json.dumps(json.loads(path.read_text()), sort_keys=True).encode())
        else:
            digest.update(str(path.stat().st_size).encode())
    return digest.hexdigest()
