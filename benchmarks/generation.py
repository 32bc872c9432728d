"""img2img generation: the reference notebook's way against skindiff's `generate`.

Baseline: one stock `StableDiffusionImg2ImgPipeline` call per source image with
`num_images_per_prompt` variants, Textual Inversion tokens loaded, the LoRA adapter loaded and
not fused, each output resized and saved as PNG. skindiff: `generate_synthetic` on the same
images with the same strength, steps, guidance and precision; with `--compile`, also with
`compile_unet` (compiling included in its time: cold in the first round, if this machine's
inductor cache has not seen the shapes, from the cache in the next ones).

Both are timed whole (pipeline loading included). It also prints the UNet's achieved
throughput: its FLOPs per call (counted by torch's FlopCounterMode on one call) x the calls
skindiff's run made, over that run's wall time (a lower bound: VAE, text encoder and PNG
writing share the time); on a GPU, as a share of the card's bf16 dense peak.

    python -m benchmarks.generation                       # CPU, tiny, 7 source images
    python -m benchmarks.generation --base-model sd21-random --resolution 512 --sources 28
"""

import argparse
import io
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from diffusers import StableDiffusionImg2ImgPipeline, UNet2DConditionModel
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import (
    add_common_arguments,
    bench_folder,
    demo_training_rows,
    measure_rounds,
    ratio_line,
    record,
    table,
)
from skindiff.core.device import resolve_mixed_precision, weight_dtype
from skindiff.diffusion.base_model import resolve_base_model
from skindiff.diffusion.config import GenerateConfig, LoraConfig, TextualInversionConfig
from skindiff.diffusion.generate import generate_synthetic, plan_generation
from skindiff.diffusion.lora import train_lora
from skindiff.diffusion.textual_inversion import train_textual_inversion

# bf16 dense tensor-core peaks (TFLOP/s, from the vendors' data sheets), by device name.
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "RTX 3090": 71.0, "L4": 121.0}


def unet_flops_per_image(
    config: GenerateConfig, device: torch.device, dtype: torch.dtype
) -> tuple[float, int]:
    """(the UNet's FLOPs for one synthetic image, its denoising steps): one call per step, on
    the image and, with guidance, its unconditioned twin."""
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        resolve_base_model(config.base_model), safety_checker=None, requires_safety_checker=False
    )
    unet: UNet2DConditionModel = pipe.unet.to(device, dtype)
    side = (
        config.resolution or unet.config.sample_size * pipe.vae_scale_factor
    ) // pipe.vae_scale_factor
    twins = 2 if config.guidance_scale > 1 else 1
    latents = torch.randn(twins, unet.config.in_channels, side, side, device=device, dtype=dtype)
    text = torch.randn(twins, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        unet(latents, 500, text)
    pipe.scheduler.set_timesteps(config.num_inference_steps)
    kept = min(int(config.num_inference_steps * config.strength), config.num_inference_steps)
    start = max(config.num_inference_steps - kept, 0) * pipe.scheduler.order
    calls = len(pipe.scheduler.timesteps[start:])
    return counter.get_total_flops() * calls, calls


def card_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def train_adapters(base_model: str, resolution: int, rows, folder: Path) -> tuple[Path, Path]:
    """Tokens and a LoRA adapter of a few steps: their values do not change the cost."""
    ti = train_textual_inversion(
        TextualInversionConfig(
            base_model=base_model,
            max_train_steps=1,
            per_token=False,
            resolution=resolution,
            train_batch_size=1,
            gradient_accumulation_steps=1,
        ),
        rows,
        folder / "ti",
        progress=False,
    )
    lora = train_lora(
        LoraConfig(
            base_model=base_model,
            max_train_steps=2,
            learning_rate=1e-3,
            resolution=resolution,
            train_batch_size=1,
        ),
        rows,
        ti.embeddings_dir,
        folder / "lora",
        progress=False,
    )
    return ti.embeddings_dir, lora.weights_path


def reference_generation(
    config: GenerateConfig,
    rows,
    embeddings_dir: Path,
    lora_file: Path,
    out_dir: Path,
    device: torch.device,
) -> None:
    dtype = weight_dtype(resolve_mixed_precision(config.mixed_precision))
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        resolve_base_model(config.base_model),
        dtype=dtype,
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipe.load_textual_inversion([str(p) for p in sorted(embeddings_dir.glob("*.safetensors"))])
    pipe.load_lora_weights(str(lora_file))
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    resolution = config.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    plan = plan_generation(config, rows)
    out_dir.mkdir()
    for source in rows.itertuples():
        prompt = plan.loc[plan["md5hash"] == source.md5hash, "prompt"].iloc[0]
        image = Image.open(source.path).convert("RGB").resize((resolution,) * 2)
        images = pipe(
            prompt,
            image=image,
            strength=config.strength,
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale,
            num_images_per_prompt=config.num_per_image,
        ).images
        for k, output in enumerate(images):
            buffer = io.BytesIO()
            output.resize((config.output_size,) * 2).save(buffer, format="PNG")
            (out_dir / f"{source.md5hash}-{k}.png").write_bytes(buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--sources", type=int, default=7, help="source images (one per condition)")
    parser.add_argument("--steps", type=int, default=40, help="scheduler steps (x strength 0.5)")
    parser.add_argument("--batch-size", type=int, default=0, help="skindiff's; 0 = its default")
    parser.add_argument(
        "--compile", action="store_true", help="also skindiff with compile_unet (a third way)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    per_condition = max(1, -(-args.sources // 7))
    rows = demo_training_rows(per_condition).head(args.sources)
    folder = bench_folder("generation")
    embeddings_dir, lora_file = train_adapters(args.base_model, args.resolution, rows, folder)
    config = GenerateConfig(
        base_model=args.base_model,
        num_inference_steps=args.steps,
        resolution=args.resolution,
        mixed_precision=args.mixed_precision,
    )
    if args.batch_size:
        config = replace(config, generation_batch_size=args.batch_size)
    images = len(rows) * config.num_per_image
    skindiff_configs = {"skindiff generate": config}
    if args.compile:
        skindiff_configs["skindiff generate, UNet compiled"] = replace(config, compile_unet=True)
    ways = {
        "reference (per source, LoRA unfused)": lambda out: reference_generation(
            config, rows, embeddings_dir, lora_file, out, device
        )
    }
    for name, way_config in skindiff_configs.items():
        ways[name] = partial(
            generate_synthetic,
            way_config,
            rows,
            embeddings_dir=embeddings_dir,
            lora_weights=lora_file,
            progress=False,
        )
    runs = measure_rounds(
        ways,
        args.repeats,
        images,
        "images",
        device,
        folder,
    )
    lines = [
        table(
            f"img2img, {args.base_model}, {images} images, {args.steps} steps x strength "
            f"{config.strength}, {device}, median of {args.repeats} rounds",
            runs,
        )
    ]
    dtype = weight_dtype(resolve_mixed_precision(config.mixed_precision))
    flops, calls = unet_flops_per_image(config, device, dtype)
    achieved = flops * images / min(run.seconds for run in runs[1:]) / 1e12
    peak = card_peak(device)
    share = f", {100 * achieved / peak:.0f}% of the card's {peak:.0f} bf16 dense" if peak else ""
    lines.append(
        f"UNet: {flops / 1e12:.3f} TFLOP per image ({calls} calls); skindiff's fastest run "
        f"achieved {achieved:.3f} TFLOP/s in the UNet over its whole wall time{share}"
    )
    for run in runs[1:]:
        lines.append(
            ratio_line(f"generation{run.name.removeprefix('skindiff generate')}", run, runs[0])
        )
    record("generation", "\n".join(lines), device)


if __name__ == "__main__":
    main()
