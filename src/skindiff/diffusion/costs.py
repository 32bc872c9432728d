"""What diffusion work costs, in units no machine decides: images, UNet evaluations and their
floating-point operations, counted from the base model's config.

The FLOPs are counted by torch's FlopCounterMode on a UNet built on the meta device: shapes
only, no weights, no memory, the same count on any machine. A training step's UNet is frozen
(Textual Inversion trains an embedding, LoRA small adapters), so its backward pass computes
the gradients of the UNet's inputs and activations, not of its weights.
"""

from functools import cache
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig

from skindiff.diffusion.base_model import resolve_base_model
from skindiff.diffusion.config import GenerateConfig, Pipeline


def unet_flops(base_model: str, resolution: int, *, training: bool) -> float:
    """FLOPs of one UNet evaluation of one image at `resolution` (pixels a side; 0: the
    model's native size): the forward pass, and with `training` the backward pass too."""
    return _counted_flops(resolve_base_model(base_model), resolution, training)


@cache
def _counted_flops(folder: Path, resolution: int, training: bool) -> float:
    unet_config = UNet2DConditionModel.load_config(folder / "unet")
    vae_config = AutoencoderKL.load_config(folder / "vae")
    text_config = CLIPTextConfig.from_pretrained(folder / "text_encoder")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config).requires_grad_(False)
        # the autoencoder halves each side at every block but the last
        scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
        side = resolution // scale if resolution else unet_config["sample_size"]
        latents = torch.zeros(1, unet_config["in_channels"], side, side)
        text = torch.zeros(
            1,
            text_config.max_position_embeddings,
            unet_config["cross_attention_dim"],
            requires_grad=training,
        )
        timestep = torch.zeros(1, dtype=torch.long)
        with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(training):
            out = unet(latents, timestep, text).sample
            if training:
                out.sum().backward()
    return float(counter.get_total_flops())


def unet_evaluations_per_image(config: GenerateConfig) -> int:
    """UNet evaluations of one generated image: its denoising steps (img2img runs the last
    `strength` of them), twice with classifier-free guidance (the unconditional pass)."""
    steps = config.num_inference_steps
    if config.pipeline == Pipeline.IMG2IMG:
        steps = min(int(steps * config.strength), steps)
    return steps * (2 if config.guidance_scale > 1 else 1)
