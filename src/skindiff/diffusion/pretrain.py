"""Pretraining the `tiny` architecture on the procedural skin corpus (`skin_corpus`).

The same diffusers classes and folder format as Stable Diffusion 2.1 base, made small enough
for a CPU: first the autoencoder learns to reconstruct skin photos (MSE plus a small KL term,
as an SD-style VAE; its latent scaling factor is then set so latents have unit variance), then
the UNet (with the text encoder) learns to denoise those latents given the caption, with a share
of empty captions so that classifier-free guidance works and offset noise so that the caption,
not the noise, decides the overall skin tone. Everything random is drawn from the seed, so
the same seed gives the same weights.
"""

import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from tqdm.auto import tqdm

from skindiff.core.files import atomic_directory
from skindiff.core.seeding import seeded_generator
from skindiff.diffusion.base_model import build_builtin_pipeline
from skindiff.diffusion.config import PretrainConfig
from skindiff.diffusion.skin_corpus import draw_corpus_image

log = logging.getLogger(__name__)

ARCHITECTURE = "tiny-random"  # the built-in random model this pretraining starts from
LATENT_STD_SAMPLE = 512  # corpus images whose latents set the scaling factor


def corpus_tensors(config: PretrainConfig, size: int) -> tuple[torch.Tensor, list[str]]:
    """The corpus as a float tensor in [-1, 1] (N, 3, size, size) and its captions."""
    images, captions = [], []
    for index in tqdm(range(config.corpus_size), desc="skin corpus", unit="img"):
        image, caption, _ = draw_corpus_image(config.seed, index, size)
        images.append(np.asarray(image))
        captions.append(caption)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return pixels, captions


def _cosine(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    )


def _batch(config: PretrainConfig, stream: str, step: int, n: int) -> torch.Tensor:
    return torch.randint(
        n, (config.batch_size,), generator=seeded_generator(stream, config.seed, step)
    )


def train_autoencoder(
    pipeline: StableDiffusionPipeline, pixels: torch.Tensor, config: PretrainConfig
) -> list[float]:
    vae = pipeline.vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate, weight_decay=0)
    schedule = _cosine(optimizer, config.vae_steps)
    losses = []
    for step in (bar := tqdm(range(config.vae_steps), desc="autoencoder")):
        batch = pixels[_batch(config, "vae-batch", step, len(pixels))]
        if step % 2:
            batch = batch.flip(-1)
        posterior = vae.encode(batch).latent_dist
        latents = posterior.sample(seeded_generator("vae-sample", config.seed, step))
        reconstruction = vae.decode(latents).sample
        loss = F.mse_loss(reconstruction, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        sample = vae.encode(pixels[:LATENT_STD_SAMPLE]).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1 / sample.std()))
    return losses


def train_unet(
    pipeline: StableDiffusionPipeline,
    pixels: torch.Tensor,
    captions: list[str],
    config: PretrainConfig,
) -> list[float]:
    """Trains UNet and text encoder together on the autoencoder's latents of the corpus."""
    vae, unet, text_encoder = pipeline.vae, pipeline.unet, pipeline.text_encoder
    scale = vae.config.scaling_factor
    with torch.no_grad():
        latents = torch.cat(
            [
                vae.encode(chunk).latent_dist.sample(seeded_generator("latents", config.seed, i))
                * scale
                for i, chunk in enumerate(pixels.split(256))
            ]
        )
    texts = [*sorted(set(captions)), ""]
    tokenizer = pipeline.tokenizer
    token_ids = tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    caption_index = torch.tensor([texts.index(caption) for caption in captions])
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    unet.train()
    text_encoder.train()
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.unet_learning_rate, weight_decay=1e-2)
    schedule = _cosine(optimizer, config.unet_steps)
    losses = []
    for step in (bar := tqdm(range(config.unet_steps), desc="unet")):
        generator = seeded_generator("unet-step", config.seed, step)
        rows = _batch(config, "unet-batch", step, len(latents))
        batch = latents[rows]
        if step % 2:
            batch = batch.flip(-1)
        which = caption_index[rows].clone()
        which[torch.rand(len(rows), generator=generator) < config.caption_dropout] = len(texts) - 1
        noise = torch.randn(batch.shape, generator=generator)
        # Offset noise: plain noise leaves an image's mean colour almost untouched at every
        # step, so without it the UNet never has to take the tone from the caption.
        offset = torch.randn((*batch.shape[:2], 1, 1), generator=generator)
        noise = noise + config.offset_noise * offset
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (len(rows),), generator=generator
        )
        noisy = noise_scheduler.add_noise(batch, noise, timesteps)
        hidden = text_encoder(token_ids[which])[0]
        loss = F.mse_loss(unet(noisy, timesteps, hidden).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    return losses


def pretrain_base_model(config: PretrainConfig, out_dir: Path) -> Path:
    """Pretrains the `tiny` architecture on the skin corpus and saves it as a diffusers folder
    at `out_dir` (which must not exist); any stage takes it as `base_model=<out_dir>`."""
    pipeline = build_builtin_pipeline(ARCHITECTURE, seed=config.seed)
    size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    pixels, captions = corpus_tensors(config, size)
    vae_losses = train_autoencoder(pipeline, pixels, config)
    unet_losses = train_unet(pipeline, pixels, captions, config)
    log.info(
        "autoencoder loss %.4f, unet loss %.4f",
        np.mean(vae_losses[-100:]),
        np.mean(unet_losses[-100:]),
    )
    with atomic_directory(Path(out_dir)) as tmp:
        pipeline.save_pretrained(tmp, safe_serialization=True)
    return Path(out_dir)
