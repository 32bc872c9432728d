"""LoRA fine-tuning on the tiny random model and the demo data (a few steps each)."""

import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.utils.checkpoint
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file

from conftest import keeping_base_pipeline, sample_image, stock_tiny_pipeline
from skindiff.core.settings import Precision
from skindiff.data.prepare import PrepareConfig, prepare_scenario
from skindiff.diffusion import lora
from skindiff.diffusion.base_model import resolve_base_model
from skindiff.diffusion.lora import LoraConfig, frozen_dtype, train_lora
from skindiff.diffusion.prompts import skin_prompt
from skindiff.diffusion.textual_inversion import TextualInversionConfig, train_textual_inversion
from skindiff.diffusion.train_data import ManifestImageDataset
from skindiff.diffusion.training import MicroBatchDraws
from skindiff.errors import SkindiffError

# lr 1e-3 instead of 5e-6: B starts at zero, and a few reference-size steps on random weights
# would change the output by less than float noise. rank != alpha checks that alpha is saved.
CONFIG = LoraConfig(
    rank=4,
    alpha=8,
    learning_rate=1e-3,
    max_train_steps=4,
    train_batch_size=2,
    resolution=32,
    checkpoint_every=2,
)
PROMPT = skin_prompt("<psoriasis>", 5)


@pytest.fixture(scope="module")
def train(demo_dataset):
    return prepare_scenario(PrepareConfig(scenario="i", seed=0)).splits.train


@pytest.fixture(scope="module")
def embeddings_dir(train, tmp_path_factory):
    config = TextualInversionConfig(max_train_steps=2, train_batch_size=2, resolution=32)
    out_dir = tmp_path_factory.mktemp("ti") / "run"
    return train_textual_inversion(config, train, out_dir, progress=False).embeddings_dir


@pytest.fixture(scope="module")
def trained(train, embeddings_dir, tmp_path_factory):
    """An uninterrupted run, plus the pipeline whose UNet it trained."""
    with keeping_base_pipeline(lora) as pipelines:
        out_dir = tmp_path_factory.mktemp("lora") / "run"
        result = train_lora(CONFIG, train, embeddings_dir, out_dir, progress=False)
    return result, pipelines[0]


def stock_pipeline(embeddings_dir) -> StableDiffusionPipeline:
    pipeline = stock_tiny_pipeline()
    pipeline.load_textual_inversion(sorted(str(p) for p in embeddings_dir.iterdir()))
    return pipeline


def test_lora_images_are_random_square_crops_of_the_resized_image(train, tmp_path):
    wide = tmp_path / "wide.png"
    noise = np.random.default_rng(0).integers(0, 256, (48, 96, 3), dtype=np.uint8)
    Image.fromarray(noise).save(wide)
    rows = train.iloc[:1].assign(path=str(wide), fitzpatrick_scale=5)
    images = ManifestImageDataset(rows, 32, "lora", seed=0)
    # 96x48 -> 64x32 (shorter side to 32, bilinear as the reference's LoRA script), then a
    # 32x32 window at a random offset, maybe flipped: every crop is a window of the resized
    # image, not of the original. (On noise, every filter resizes to other pixels.)
    resized = Image.open(wide).convert("RGB").resize((64, 32), Image.Resampling.BILINEAR)
    resized = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float() / 127.5 - 1
    offsets = set()
    for d in range(20):
        crop = images[d]["pixel_values"]
        assert crop.shape == (3, 32, 32)
        windows = [resized[:, :, left : left + 32] for left in range(64 - 32 + 1)]
        matches = [
            left
            for left, window in enumerate(windows)
            if torch.equal(crop, window) or torch.equal(crop, window.flip(-1))
        ]
        assert matches, f"draw {d} is not a window of the resized image"
        offsets.add(matches[0])
    assert len(offsets) > 2  # crops at many offsets
    assert images[3]["fitzpatrick_scale"] == 5


def test_lora_loads_into_a_stock_pipeline_changes_output_and_unloads_to_the_base(
    trained, embeddings_dir
):
    result, _ = trained
    assert result.weights_path.name == "pytorch_lora_weights.safetensors"
    assert len(result.losses) == CONFIG.max_train_steps
    pipeline = stock_pipeline(embeddings_dir)
    base = sample_image(pipeline, PROMPT)

    pipeline.load_lora_weights(result.weights_path.parent)
    adapter = pipeline.unet.peft_config[pipeline.get_active_adapters()[0]]
    assert (adapter.r, adapter.lora_alpha) == (CONFIG.rank, CONFIG.alpha)
    assert np.abs(sample_image(pipeline, PROMPT) - base).max() > 1e-3

    pipeline.unload_lora_weights()
    np.testing.assert_array_equal(sample_image(pipeline, PROMPT), base)


def test_training_leaves_the_base_unet_weights_untouched(trained):
    _, pipeline = trained
    fresh = UNet2DConditionModel.from_pretrained(resolve_base_model("tiny"), subfolder="unet")
    trained_state = pipeline.unet.state_dict()
    base = {n.replace(".base_layer", ""): p for n, p in trained_state.items() if "lora_" not in n}
    fresh_state = fresh.state_dict()
    assert base.keys() == fresh_state.keys()
    assert all(torch.equal(base[name], fresh_state[name]) for name in fresh_state)
    ups = [p for n, p in trained_state.items() if "lora_B" in n]
    assert ups and all(p.abs().max() > 0 for p in ups)  # the adapter did train


def test_run_interrupted_in_optimizer_step_3_resumes_from_step_2_checkpoint_to_same_weights(
    trained, train, embeddings_dir, tmp_path, monkeypatch, caplog
):
    """A run that dies (here: an exception) during its 3rd optimizer step, with checkpoints
    every 2 steps, resumes from step-2 and ends with the uninterrupted run's weights and loss
    curve, bit for bit. (Textual Inversion's test covers a real SIGKILL.)"""
    result, _ = trained
    out_dir = tmp_path / "run"
    step, calls = torch.optim.AdamW.step, []

    def step_or_crash(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_or_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_lora(CONFIG, train, embeddings_dir, out_dir, progress=False)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    checkpoint = out_dir / "checkpoints" / "step-2"
    assert sorted(p.name for p in checkpoint.parent.glob("step-*")) == ["step-2"]
    assert not list(checkpoint.glob("model*"))  # only the adapter, not the whole UNet

    with caplog.at_level(logging.INFO, logger="skindiff.diffusion.training"):
        resumed = train_lora(CONFIG, train, embeddings_dir, out_dir, progress=False)
    assert "resuming from checkpoint step-2" in caplog.text
    assert resumed.losses == result.losses
    first, second = load_file(result.weights_path), load_file(resumed.weights_path)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_gradient_checkpointing_trains_the_same_adapter(
    trained, train, embeddings_dir, tmp_path, monkeypatch
):
    result, plain_pipeline = trained
    assert not plain_pipeline.unet.is_gradient_checkpointing
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    config = replace(CONFIG, gradient_checkpointing=True)
    with keeping_base_pipeline(lora) as pipelines:
        checkpointed = train_lora(config, train, embeddings_dir, tmp_path, progress=False)
    # Checkpointing was on: the UNet says so and its blocks ran under torch.utils.checkpoint.
    assert pipelines[0].unet.is_gradient_checkpointing
    assert calls, "no UNet block ran under torch.utils.checkpoint"
    np.testing.assert_allclose(checkpointed.losses, result.losses, rtol=1e-5)
    first, second = load_file(result.weights_path), load_file(checkpointed.weights_path)
    assert first.keys() == second.keys()
    assert all(torch.allclose(first[key], second[key], atol=1e-6) for key in first)


def test_snr_gamma_reweights_the_loss(trained, train, embeddings_dir, tmp_path):
    result, _ = trained
    # A gamma below the schedule's smallest SNR (about 0.005) down-weights every sample
    # (gamma / snr < 1); same batches, noise and timesteps, so the first loss must shrink.
    config = replace(CONFIG, snr_gamma=1e-3)
    weighted = train_lora(config, train, embeddings_dir, tmp_path, progress=False)
    assert all(np.isfinite(weighted.losses))
    assert weighted.losses[0] < 0.5 * result.losses[0]


def test_without_embeddings_conditions_are_named_in_words(train, tmp_path, monkeypatch):
    captions = []

    def recording_prompt(concept: str, fitzpatrick_scale: int) -> str:
        captions.append((concept, fitzpatrick_scale))
        return skin_prompt(concept, fitzpatrick_scale)

    monkeypatch.setattr(lora, "skin_prompt", recording_prompt)
    config = replace(CONFIG, max_train_steps=1)
    result = train_lora(config, train, None, tmp_path, progress=False)
    assert result.weights_path.is_file()
    # One caption per image drawn: 1 step x batch 2 x accumulation 1.
    assert len(captions) == (
        config.max_train_steps * config.train_batch_size * config.gradient_accumulation_steps
    )
    assert {concept for concept, _ in captions} <= set(train["label"])
    assert {fst for _, fst in captions} <= {1, 2, 5, 6}


def test_frozen_weights_stay_float32_under_half_precision_unless_asked():
    """As the reference's fp16 LoRA run: frozen UNet, VAE and text encoder in float32."""
    default = LoraConfig().frozen_weights
    for precision in (Precision.FP16, Precision.BF16, Precision.NO):
        assert frozen_dtype(default, precision) == torch.float32
    assert frozen_dtype("half", Precision.FP16) == torch.float16
    assert frozen_dtype("half", Precision.BF16) == torch.bfloat16
    assert frozen_dtype("half", Precision.NO) == torch.float32


BF16_RUNS = """
import json, sys, tempfile
from conftest import keeping_base_pipeline
from skindiff.data.prepare import PrepareConfig, prepare_scenario
from skindiff.diffusion import lora
from skindiff.diffusion.lora import LoraConfig, train_lora

train = prepare_scenario(PrepareConfig(scenario="i", seed=0)).splits.train
found = {}
for frozen_weights in ("full", "half"):
    config = LoraConfig(**json.loads(sys.argv[1]), frozen_weights=frozen_weights)
    with keeping_base_pipeline(lora) as pipelines:
        result = train_lora(config, train, None, tempfile.mkdtemp(), progress=False)
    pipeline = pipelines[0]
    unet = dict(pipeline.unet.named_parameters())
    found[frozen_weights] = {
        "losses": result.losses,
        "vae": str(pipeline.vae.dtype),
        "text_encoder": str(pipeline.text_encoder.dtype),
        "unet": sorted({str(p.dtype) for name, p in unet.items() if "lora_" not in name}),
        "adapter": sorted({str(p.dtype) for name, p in unet.items() if "lora_" in name}),
    }
print(json.dumps(found))
"""


@pytest.mark.slow  # a subprocess (accelerate fixes the precision once per process): 2 runs
def test_training_under_mixed_precision_keeps_the_frozen_weights_dtype(train):
    """Runs under bf16 mixed precision (accelerate's autocast) train with the frozen weights
    in float32 by default, in bf16 with `half`, and the adapter in float32 either way."""
    settings = {
        "rank": CONFIG.rank,
        "alpha": CONFIG.alpha,
        "learning_rate": CONFIG.learning_rate,
        "max_train_steps": 2,
        "train_batch_size": CONFIG.train_batch_size,
        "resolution": CONFIG.resolution,
        "mixed_precision": "bf16",
    }
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", BF16_RUNS, json.dumps(settings)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    for frozen_weights, dtype in (("full", "torch.float32"), ("half", "torch.bfloat16")):
        run = found[frozen_weights]
        assert all(np.isfinite(run["losses"])) and len(run["losses"]) == 2
        assert (run["vae"], run["text_encoder"], run["unet"]) == (dtype, dtype, [dtype])
        assert run["adapter"] == ["torch.float32"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rank": 0}, "rank"),
        ({"snr_gamma": -1.0}, "snr_gamma"),
        ({"target_modules": ()}, "target_modules"),
        ({"checkpoint_every": 0}, "checkpoint_every"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_settings_raise_one_clear_error(train, tmp_path, change, message):
    with pytest.raises(SkindiffError, match=message):
        train_lora(replace(CONFIG, **change), train, None, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_bad_inputs_are_refused(train, embeddings_dir, tmp_path):
    with pytest.raises(SkindiffError, match="empty"):
        train_lora(CONFIG, train.iloc[:0], None, tmp_path / "a")
    with pytest.raises(SkindiffError, match=r"no \*\.safetensors"):
        train_lora(CONFIG, train, tmp_path, tmp_path / "b")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "psoriasis.safetensors").write_bytes(
        (embeddings_dir / "psoriasis.safetensors").read_bytes()
    )
    with pytest.raises(SkindiffError, match="no token for the condition"):
        train_lora(CONFIG, train, partial, tmp_path / "c")
    with pytest.raises(SkindiffError, match="Fitzpatrick"):
        train_lora(CONFIG, train.assign(fitzpatrick_scale=-1), None, tmp_path / "d")
    with pytest.raises(SkindiffError, match="target_modules"):
        train_lora(replace(CONFIG, target_modules=("no_such_layer",)), train, None, tmp_path / "e")


def one_draw(generator: torch.Generator, pixels: Sequence) -> MicroBatchDraws:
    """All of `pixels` as one micro-batch drawing from `generator`."""
    return MicroBatchDraws((generator,), len(pixels))


def test_frozen_encodings_are_computed_once_and_match_encoding_every_batch(train, embeddings_dir):
    """The training fast path: each augmented image and caption goes through its frozen
    encoder once; its latents and hidden states equal encoding each batch anew (the diffusers
    example scripts' way) within float tolerance, and a fresh cache (a resumed run) computes
    exactly the same values."""
    from skindiff.diffusion.training import FrozenEncodings, encode_captions, load_base_pipeline

    pipeline = load_base_pipeline("tiny")
    dataset = ManifestImageDataset(train, 32, "lora", seed=0)
    draws = [dataset[d] for d in range(len(dataset) + 4)]  # one epoch, then 4 images again
    pixels = torch.stack([draw["pixel_values"] for draw in draws])
    keys = [draw["key"] for draw in draws]
    assert len(set(keys)) < len(keys)
    captions = [skin_prompt(draw["condition"], draw["fitzpatrick_scale"]) for draw in draws]

    encoded = []
    pipeline.vae.encoder.register_forward_hook(lambda *_: encoded.append("vae"))
    pipeline.text_encoder.register_forward_hook(lambda *_: encoded.append("text"))
    cached = FrozenEncodings(pipeline.vae, pipeline.text_encoder)
    latents = cached.latents(pixels, keys, one_draw(torch.Generator().manual_seed(1), pixels))
    states = cached.caption_states(pipeline, captions)
    assert encoded.count("vae") == len(set(keys))
    assert encoded.count("text") == len(set(captions))

    with torch.no_grad():
        per_batch = pipeline.vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(1))
        per_batch_states = encode_captions(pipeline, pipeline.text_encoder, captions, "cpu")
    torch.testing.assert_close(latents, per_batch * pipeline.vae.config.scaling_factor)
    torch.testing.assert_close(states, per_batch_states)

    # A resumed run starts with nothing remembered, or remembers other images first.
    again = FrozenEncodings(pipeline.vae, pipeline.text_encoder)
    again.latents(pixels.flip(0), keys[::-1], one_draw(torch.Generator(), pixels.flip(0)))
    for fresh in (again, FrozenEncodings(pipeline.vae, pipeline.text_encoder)):
        assert torch.equal(
            fresh.latents(pixels, keys, one_draw(torch.Generator().manual_seed(1), pixels)), latents
        )
        assert torch.equal(fresh.caption_states(pipeline, captions), states)


def test_frozen_encoders_run_at_their_weights_dtype_under_autocast(train):
    """In a mixed-precision step the float32 VAE and text encoder compute in float32, as the
    reference's (autocast wraps the UNet only): the same encodings as outside autocast."""
    from skindiff.diffusion.training import FrozenEncodings, load_base_pipeline

    pipeline = load_base_pipeline("tiny")
    dataset = ManifestImageDataset(train.head(4), 32, "lora", seed=0)
    draws = [dataset[d] for d in range(4)]
    pixels = [draw["pixel_values"] for draw in draws]
    keys = [draw["key"] for draw in draws]
    captions = [skin_prompt(draw["condition"], draw["fitzpatrick_scale"]) for draw in draws]

    def encode() -> tuple[torch.Tensor, torch.Tensor]:
        encodings = FrozenEncodings(pipeline.vae, pipeline.text_encoder)
        generator = torch.Generator().manual_seed(0)
        latents = encodings.latents(pixels, keys, one_draw(generator, pixels))
        return latents, encodings.caption_states(pipeline, captions)

    plain = encode()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = encode()
    for outside, inside in zip(plain, autocast, strict=True):
        assert inside.dtype == torch.float32
        assert torch.equal(inside, outside)


def test_fixed_images_are_encoded_up_front_in_batches_when_drawn_often(train):
    """A run that draws its images more often than it has them encodes each fixed-crop image
    (both flips) once, up front, in batches; one drawing fewer encodes as it draws."""
    from skindiff.diffusion.training import ENCODING_BATCH, FrozenEncodings, load_base_pipeline

    pipeline = load_base_pipeline("tiny")
    dataset = ManifestImageDataset(train.head(10), 32, "ti", seed=0)
    calls = []
    pipeline.vae.encoder.register_forward_hook(lambda _, args, __: calls.append(len(args[0])))
    encodings = FrozenEncodings(pipeline.vae)
    encodings.encode_fixed_images(dataset, draws=20)
    assert calls == []
    encodings.encode_fixed_images(dataset, draws=21)
    assert sum(calls) == 20 and max(calls) == ENCODING_BATCH

    # Every draw is one of the fixed images, so none is decoded or encoded again.
    draws = [dataset[d] for d in range(30)]
    assert [draw["pixel_values"] for draw in draws] == [None] * 30
    keys = [draw["key"] for draw in draws]
    latents = encodings.latents([None] * 30, keys, one_draw(torch.Generator().manual_seed(0), keys))
    assert sum(calls) == 20
    decoded = ManifestImageDataset(train.head(10), 32, "ti", seed=0)
    pixels = torch.stack([decoded[d]["pixel_values"] for d in range(30)])
    with torch.no_grad():
        anew = pipeline.vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(0))
    torch.testing.assert_close(latents, anew * pipeline.vae.config.scaling_factor)
