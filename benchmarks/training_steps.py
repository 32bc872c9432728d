"""Textual Inversion and LoRA steps: the diffusers example scripts' way against skindiff's.

Baseline: each micro-batch is decoded, encoded by the VAE and its captions by the text encoder
anew, as diffusers' `textual_inversion.py` and `train_text_to_image_lora.py` do. skindiff:
`train_textual_inversion` (one token, as one example-script run) and `train_lora`, which
encode each distinct image and caption once and, on a CPU, run a step's micro-batches in one
pass. Same model, images, batch, steps and precision.

    python -m benchmarks.training_steps                  # CPU, tiny
    python -m benchmarks.training_steps --base-model sd21-random --resolution 128 --images 4
    python -m benchmarks.training_steps --base-model sd21-random --resolution 512 --steps 20
"""

import argparse
import random
from dataclasses import replace

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig as PeftLoraConfig
from torch.utils.data import DataLoader

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
from skindiff.diffusion.config import LoraConfig, TextualInversionConfig
from skindiff.diffusion.lora import train_lora
from skindiff.diffusion.prompts import TI_TEMPLATES, placeholder_token, skin_prompt
from skindiff.diffusion.textual_inversion import train_textual_inversion
from skindiff.diffusion.train_data import ManifestImageDataset
from skindiff.diffusion.training import (
    add_token_embeddings,
    encode_captions,
    load_base_pipeline,
    make_accelerator,
    resolve_resolution,
)

CONDITION = "psoriasis"
# How often the paper's runs draw each training image (scenario i: 1,519 images, about 217 per
# condition): LoRA 3,000 steps x 4 images / 1,519; a token 500 steps x 16 images / 217. Caching
# pays by repetition, so the default runs repeat as much.
PAPER_DRAWS_PER_IMAGE = {"lora": 3000 * 4 / 1519, "ti": 500 * 16 / 217}


def paper_like_steps(kind: str, images: int, per_step: int) -> int:
    return max(1, round(PAPER_DRAWS_PER_IMAGE[kind] * images / per_step))


def example_script_steps(kind: str, config, rows, steps: int) -> None:
    """`steps` optimizer steps as the diffusers example scripts take them."""
    accelerator = make_accelerator(config.mixed_precision)
    device = accelerator.device
    dtype = weight_dtype(resolve_mixed_precision(config.mixed_precision))
    pipeline = load_base_pipeline(config.base_model)
    resolution = resolve_resolution(pipeline, config.resolution)
    token = placeholder_token(CONDITION)
    vae, unet, text_encoder = pipeline.vae, pipeline.unet, pipeline.text_encoder
    for module in (vae, unet, text_encoder):
        module.requires_grad_(False)
    if kind == "ti":
        start = (
            text_encoder.get_input_embeddings()
            .weight[pipeline.tokenizer.encode(config.initializer_word, add_special_tokens=False)[0]]
            .detach()
        )
        add_token_embeddings(pipeline, {token: start[None]})
        vae.to(device, dtype)
        unet.to(device, dtype)
        text_encoder.to(device)
        trained = text_encoder.get_input_embeddings().weight
        trained.requires_grad_(True)
        original = trained.detach().clone()
        keep = torch.ones(len(trained), dtype=torch.bool, device=device)
        keep[pipeline.tokenizer.convert_tokens_to_ids(token)] = False
        model = text_encoder
    else:
        add_token_embeddings(pipeline, {token: torch.zeros(1, text_encoder.config.hidden_size)})
        unet.add_adapter(
            PeftLoraConfig(
                r=config.rank,
                lora_alpha=config.alpha,
                init_lora_weights="gaussian",
                target_modules=list(config.target_modules),
            )
        )
        for module in (vae, unet, text_encoder):
            module.to(device, dtype)
        cast_training_params(unet, dtype=torch.float32)
        model = unet
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    dataset = ManifestImageDataset(rows, resolution, kind, seed=0)
    loader = DataLoader(
        dataset,
        batch_size=config.train_batch_size,
        sampler=range(steps * config.train_batch_size * config.gradient_accumulation_steps),
    )
    batches = iter(loader)
    scheduler = pipeline.scheduler
    for _ in range(steps):
        for _ in range(config.gradient_accumulation_steps):
            batch = next(batches)
            with accelerator.autocast():
                latents = vae.encode(batch["pixel_values"].to(device, dtype)).latent_dist.sample()
                latents = latents * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, 1000, (len(latents),), device=device)
                noisy = scheduler.add_noise(latents, noise, timesteps)
                if kind == "ti":
                    captions = [random.choice(TI_TEMPLATES).format(token) for _ in latents]
                    hidden = encode_captions(pipeline, text_encoder, captions, device)
                else:
                    captions = [skin_prompt(token, int(f)) for f in batch["fitzpatrick_scale"]]
                    with torch.no_grad():
                        hidden = encode_captions(pipeline, text_encoder, captions, device)
                prediction = unet(noisy, timesteps, hidden.to(dtype)).sample
                loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
            accelerator.backward(loss / config.gradient_accumulation_steps)
        if kind == "lora":  # the LoRA example clips at its max_grad_norm, 1.0 as here
            accelerator.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        if kind == "ti":  # the example script puts back every row but the token's
            with torch.no_grad():
                trained[keep] = original[keep]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument(
        "--steps",
        type=int,
        default=0,
        help="optimizer steps of each run; 0: as many draws per image as the paper's runs",
    )
    parser.add_argument(
        "--images",
        type=int,
        default=0,
        help="training images of each run (0: all the demo's); fewer keep sd21-random on a CPU "
        "to minutes",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = demo_training_rows()
    one_condition = rows[rows["label"] == CONDITION]
    if args.images:
        rows, one_condition = rows.head(args.images), one_condition.head(args.images)
    folder = bench_folder("training")
    common = {
        "base_model": args.base_model,
        "resolution": args.resolution,
        "mixed_precision": args.mixed_precision,
    }
    ti = TextualInversionConfig(conditions=(CONDITION,), **common)
    lora = LoraConfig(**common)
    ti_steps = args.steps or paper_like_steps("ti", len(one_condition), 16)
    lora_steps = args.steps or paper_like_steps("lora", len(rows), 4)
    ti = replace(ti, max_train_steps=ti_steps, checkpoint_every=ti_steps)
    lora = replace(lora, max_train_steps=lora_steps, checkpoint_every=lora_steps)
    runs = {
        "ti": measure_rounds(
            {
                "example script": lambda _: example_script_steps("ti", ti, one_condition, ti_steps),
                "skindiff": lambda out: train_textual_inversion(
                    ti, one_condition, out, progress=False
                ),
            },
            args.repeats,
            ti_steps,
            "steps",
            device,
            folder / "ti",
        ),
        "lora": measure_rounds(
            {
                "example script": lambda _: example_script_steps("lora", lora, rows, lora_steps),
                "skindiff": lambda out: train_lora(lora, rows, None, out, progress=False),
            },
            args.repeats,
            lora_steps,
            "steps",
            device,
            folder / "lora",
        ),
    }
    tables = []
    for kind, images, config in (("ti", len(one_condition), ti), ("lora", len(rows), lora)):
        per_step = config.train_batch_size * config.gradient_accumulation_steps
        tables.append(
            table(
                f"{kind}: {args.base_model}, {config.max_train_steps} steps of {per_step} "
                f"images from {images} ({config.max_train_steps * per_step / images:.1f} draws "
                f"each), {device}, median of {args.repeats} rounds",
                runs[kind],
            )
        )
    ratios = [
        ratio_line("textual inversion steps", runs["ti"][1], runs["ti"][0]),
        ratio_line("lora steps", runs["lora"][1], runs["lora"][0]),
    ]
    record("training_steps", "\n\n".join(tables) + "\n" + "\n".join(ratios), device)


if __name__ == "__main__":
    main()
