"""Textual Inversion on the tiny random model and the demo data (a few steps each)."""

import json
import logging
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTextModel

from conftest import (
    keeping_base_pipeline,
    recording_calls,
    sample_image,
    stock_tiny_pipeline,
)
from skindiff.data.images import load_rgb
from skindiff.data.prepare import PrepareConfig, prepare_scenario
from skindiff.diffusion import textual_inversion
from skindiff.diffusion.adapters import NEW_EMBEDDINGS_NOTE, token_file_name
from skindiff.diffusion.base_model import resolve_base_model
from skindiff.diffusion.config import TiTemplates
from skindiff.diffusion.prompts import REFERENCE_TI_TEMPLATES
from skindiff.diffusion.textual_inversion import (
    TextualInversionConfig,
    draw_captions,
    train_textual_inversion,
)
from skindiff.diffusion.train_data import ManifestImageDataset
from skindiff.diffusion.training import MicroBatchDraws, add_token_embeddings, token_ids
from skindiff.errors import SkindiffError

# Small and quick, with a learning rate that moves the tokens measurably in 6 steps.
SETTINGS = {
    "max_train_steps": 6,
    "train_batch_size": 2,
    "gradient_accumulation_steps": 2,
    "learning_rate": 5e-3,
    "resolution": 32,
    "checkpoint_every": 2,
}
CONFIG = TextualInversionConfig(**SETTINGS)
PROMPT = "a photo of a <psoriasis>"


@pytest.fixture(scope="module")
def train(demo_dataset):
    return prepare_scenario(PrepareConfig(scenario="i", seed=0)).splits.train


@pytest.fixture(scope="module")
def trained(train, tmp_path_factory):
    """An uninterrupted run, plus the pipeline it trained (to inspect the embedding matrix)."""
    with keeping_base_pipeline(textual_inversion) as pipelines:
        result = train_textual_inversion(
            CONFIG, train, tmp_path_factory.mktemp("ti") / "run", progress=False
        )
    return result, pipelines[0]


def saved_embeddings(result) -> dict[str, torch.Tensor]:
    return {
        token: load_file(result.embeddings_dir / token_file_name(token))[token]
        for token in result.tokens.values()
    }


def test_ti_images_visit_every_row_each_epoch_flipped_at_random_and_reproducibly(train):
    images = ManifestImageDataset(train, 32, "ti", seed=0)
    n = len(images)
    assert sorted(images.row_of(d) for d in range(n)) == list(range(n))
    assert [images.row_of(d) for d in range(n)] != [images.row_of(d) for d in range(n, 2 * n)]

    row = images.row_of(0)
    draws = [d for d in range(8 * n) if images.row_of(d) == row]
    pixels = [images[d]["pixel_values"] for d in draws]
    assert pixels[0].shape == (3, 32, 32)
    assert min(float(p.min()) for p in pixels) >= -1
    assert max(float(p.max()) for p in pixels) <= 1
    flipped = [not torch.equal(p, pixels[0]) for p in pixels]
    assert any(flipped) and not all(flipped[1:])
    assert all(
        torch.equal(p, pixels[0].flip(-1)) for p, f in zip(pixels, flipped, strict=True) if f
    )
    again = ManifestImageDataset(train, 32, "ti", seed=0)
    assert torch.equal(again[draws[1]]["pixel_values"], pixels[1])
    assert images[0]["condition"] == train["label"].iloc[row]
    # The whole image resized bicubic, as the reference's Textual Inversion script.
    resized = load_rgb(train["path"].iloc[row]).resize((32, 32), Image.Resampling.BICUBIC)
    expected = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert any(torch.equal(pixels[0], image) for image in (expected, expected.flip(-1)))


def template_of(caption: str, token: str) -> str:
    return caption.replace(token, "{}")


def test_captions_come_from_the_reference_templates(train, tmp_path, monkeypatch):
    """The captions a run encodes are the reference code's 11 templates filled with the
    image's token, all of them drawn; the ImageNet object templates (27, with "a dark photo
    of the {}", ...) only on request."""
    encoded = recording_calls(
        monkeypatch,
        textual_inversion,
        "encode_captions",
        lambda pipeline, encoder, captions, device: list(captions),
    )
    config = replace(CONFIG, base_model="tiny-random", max_train_steps=2, checkpoint_every=10)
    result = train_textual_inversion(config, train, tmp_path / "run", progress=False)
    captions = [caption for call in encoded for caption in call]
    assert len(captions) == 2 * 2 * 2 * len(result.tokens)  # steps x batch x accumulation
    templates = [
        template_of(caption, token)
        for caption in captions
        for token in result.tokens.values()
        if token in caption
    ]
    assert len(templates) == len(captions)
    assert set(templates) == set(REFERENCE_TI_TEMPLATES)
    assert "a dark photo of the {}" not in templates

    generators = tuple(torch.Generator().manual_seed(k) for k in range(4))
    tokens = ["<psoriasis>"] * 4 * 50
    imagenet = draw_captions(
        TiTemplates.IMAGENET_OBJECT.texts, tokens, MicroBatchDraws(generators, 50)
    )
    drawn = {template_of(caption, "<psoriasis>") for caption in imagenet}
    assert drawn - set(REFERENCE_TI_TEMPLATES)  # e.g. "a photo of a clean {}"
    assert len(drawn) > len(REFERENCE_TI_TEMPLATES)


def test_only_the_new_token_rows_of_the_embedding_matrix_change(trained):
    result, pipeline = trained
    matrix = pipeline.text_encoder.get_input_embeddings().weight.detach()
    base = CLIPTextModel.from_pretrained(resolve_base_model("tiny"), subfolder="text_encoder")
    base_matrix = base.get_input_embeddings().weight.detach()
    vocab = len(base_matrix)
    assert len(matrix) == vocab + len(result.tokens)
    assert torch.equal(matrix[:vocab], base_matrix)  # bit-identical, not merely close

    initial = base_matrix[pipeline.tokenizer.convert_tokens_to_ids("skin</w>")]
    saved = saved_embeddings(result)
    for token in result.tokens.values():
        row = pipeline.tokenizer.convert_tokens_to_ids(token)
        assert row >= vocab
        assert torch.equal(saved[token], matrix[row : row + 1])
        assert (matrix[row] - initial).abs().max() > 1e-3
    assert list(result.losses) == list(CONFIG.conditions)  # one loss curve per token
    assert all(len(curve) == CONFIG.max_train_steps for curve in result.losses.values())
    assert result.validation_images is not None and result.validation_images.is_file()


def test_saved_embeddings_load_into_a_stock_pipeline_and_change_its_output(trained):
    result, _ = trained
    learned = stock_tiny_pipeline()
    learned.load_textual_inversion(sorted(str(p) for p in result.embeddings_dir.iterdir()))
    assert set(result.tokens.values()) <= set(learned.tokenizer.get_vocab())

    untrained = stock_tiny_pipeline()
    text_encoder, tokenizer = untrained.text_encoder, untrained.tokenizer
    initial = text_encoder.get_input_embeddings().weight[
        tokenizer.convert_tokens_to_ids("skin</w>")
    ]
    untrained.load_textual_inversion({"<psoriasis>": initial.detach()[None]})

    assert np.abs(sample_image(learned, PROMPT) - sample_image(untrained, PROMPT)).max() > 1e-3


def test_same_seed_gives_bit_identical_embeddings(trained, train, tmp_path):
    result, _ = trained
    again = train_textual_inversion(CONFIG, train, tmp_path / "again", progress=False)
    assert again.losses == result.losses
    first, second = saved_embeddings(result), saved_embeddings(again)
    assert all(torch.equal(first[token], second[token]) for token in first)


def test_each_token_trains_as_a_run_on_its_condition_alone(trained, train, tmp_path):
    """Per token (the default), a run's token equals, within float tolerance, that of a run on
    its condition's images alone with the same seed; with shared batches it does not."""
    result, _ = trained
    joint = saved_embeddings(result)["<psoriasis>"]
    alone = train_textual_inversion(
        replace(CONFIG, conditions=("psoriasis",)),
        train[train["label"] == "psoriasis"],
        tmp_path / "alone",
        progress=False,
    )
    torch.testing.assert_close(saved_embeddings(alone)["<psoriasis>"], joint, rtol=0, atol=1e-6)
    np.testing.assert_allclose(alone.losses["psoriasis"], result.losses["psoriasis"], rtol=1e-5)

    shared = train_textual_inversion(
        replace(CONFIG, per_token=False), train, tmp_path / "shared", progress=False
    )
    assert list(shared.losses) == ["all"]
    assert (saved_embeddings(shared)["<psoriasis>"] - joint).abs().max() > 1e-4


def test_joined_micro_batches_train_as_one_pass_per_micro_batch_does(
    trained, train, tmp_path, monkeypatch
):
    """A step's micro-batches in one pass (auto, on a CPU) train the tokens one pass per
    micro-batch trains, to float rounding: each micro-batch draws its noise, timesteps and
    templates from its own generator either way."""
    result, _ = trained
    pass_sizes = recording_calls(
        monkeypatch,
        textual_inversion,
        "noise_prediction_loss",
        lambda unet, scheduler, latents, *_: len(latents),
    )
    separate = train_textual_inversion(
        replace(CONFIG, micro_batch_passes="separate"), train, tmp_path / "separate", False
    )
    assert set(pass_sizes) == {CONFIG.train_batch_size}
    first, second = saved_embeddings(result), saved_embeddings(separate)
    for token in first:
        torch.testing.assert_close(second[token], first[token], rtol=0, atol=1e-6)
    for condition in result.losses:
        np.testing.assert_allclose(separate.losses[condition], result.losses[condition], rtol=1e-5)

    pass_sizes.clear()
    joined = replace(CONFIG, micro_batch_passes="joined", max_train_steps=1)
    train_textual_inversion(joined, train, tmp_path / "joined", False)
    assert set(pass_sizes) == {CONFIG.train_batch_size * CONFIG.gradient_accumulation_steps}


KILLED_RUN = """
import json, os, signal, sys
from pathlib import Path
import torch
from skindiff.data.prepare import PrepareConfig, prepare_scenario
from skindiff.diffusion.textual_inversion import TextualInversionConfig, train_textual_inversion

out_dir, kill_at, settings = Path(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
step, calls = torch.optim.AdamW.step, []

def step_or_die(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, *args, **kwargs)

torch.optim.AdamW.step = step_or_die
train = prepare_scenario(PrepareConfig(scenario="i", seed=0)).splits.train
train_textual_inversion(TextualInversionConfig(**settings), train, out_dir, progress=False)
"""


@pytest.mark.slow  # a subprocess, killed
def test_run_sigkilled_in_optimizer_step_5_resumes_from_step_4_checkpoint_to_same_embeddings(
    trained, train, tmp_path, caplog
):
    """A process SIGKILLed during its 5th optimizer step (checkpoints every 2 steps) leaves
    checkpoint step-4; a new call resumes from it and ends with the embeddings and loss curve
    of the uninterrupted run, bit for bit."""
    result, _ = trained
    out_dir = tmp_path / "run"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(out_dir), "5", json.dumps(SETTINGS)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [p.name for p in (out_dir / "checkpoints").glob("step-*")] == ["step-4"]
    assert not (out_dir / "done").exists()

    with caplog.at_level(logging.INFO, logger="skindiff.diffusion.training"):
        resumed = train_textual_inversion(CONFIG, train, out_dir, progress=False)
    assert "resuming from checkpoint step-4" in caplog.text
    assert resumed.losses == result.losses
    first, second = saved_embeddings(result), saved_embeddings(resumed)
    assert all(torch.equal(first[token], second[token]) for token in first)
    assert not (out_dir / "checkpoints").exists()  # dropped once the run is done


def test_finished_out_dir_is_returned_without_training(trained, train, monkeypatch):
    result, _ = trained

    def no_loading(base_model):
        raise AssertionError("a finished run loaded the model again")

    monkeypatch.setattr(textual_inversion, "load_base_pipeline", no_loading)
    started = time.monotonic()
    again = train_textual_inversion(CONFIG, train, result.embeddings_dir.parent, progress=False)
    assert time.monotonic() - started < 5
    assert again == result


def test_multi_vector_tokens_load_with_the_stock_loader(train, tmp_path):
    config = replace(CONFIG, num_vectors=2, max_train_steps=2, conditions=("psoriasis",))
    result = train_textual_inversion(config, train, tmp_path, progress=False)
    saved = load_file(result.embeddings_dir / "psoriasis.safetensors")
    assert list(saved) == ["<psoriasis>"] and saved["<psoriasis>"].shape[0] == 2

    pipeline = stock_tiny_pipeline()
    pipeline.load_textual_inversion(str(result.embeddings_dir / "psoriasis.safetensors"))
    assert pipeline.maybe_convert_prompt(PROMPT, pipeline.tokenizer) == PROMPT + " <psoriasis>_1"
    assert sample_image(pipeline, PROMPT).shape == (1, 32, 32, 3)


def test_new_tokens_are_added_without_transformers_note_on_their_initial_rows(
    library_log: pytest.LogCaptureFixture,
):
    """The note says how the vocabulary's new rows start; the embeddings overwrite them."""
    pipeline = stock_tiny_pipeline()
    width = pipeline.text_encoder.get_input_embeddings().weight.shape[-1]
    embedding = torch.randn(2, width)
    add_token_embeddings(pipeline, {"<psoriasis>": embedding})
    rows = pipeline.text_encoder.get_input_embeddings().weight[token_ids(pipeline, "<psoriasis>")]
    assert torch.equal(rows, embedding)
    logged = [record.getMessage() for record in library_log.records]
    assert not [text for text in logged if text.startswith(NEW_EMBEDDINGS_NOTE.start)]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_vectors": 0}, "num_vectors"),
        ({"max_train_steps": 0}, "max_train_steps"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"conditions": ()}, "conditions"),
        ({"conditions": ("psoriasis", "unknown rash")}, "unknown rash"),
    ],
)
def test_bad_settings_raise_one_clear_error(train, tmp_path, change, message):
    with pytest.raises(SkindiffError, match=message):
        train_textual_inversion(replace(CONFIG, **change), train, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_bad_training_sets_and_reused_out_dirs_are_refused(trained, train, tmp_path):
    with pytest.raises(SkindiffError, match="empty"):
        train_textual_inversion(CONFIG, train.iloc[:0], tmp_path / "a")
    with pytest.raises(SkindiffError, match="psoriasis"):
        train_textual_inversion(CONFIG, train[train["label"] != "psoriasis"], tmp_path / "b")
    with pytest.raises(SkindiffError, match="initializer_word"):
        bad = replace(CONFIG, initializer_word="skin lesion")
        train_textual_inversion(bad, train, tmp_path / "c")
    result, _ = trained
    with pytest.raises(SkindiffError, match=r"other settings or inputs \(config.seed\)"):
        train_textual_inversion(replace(CONFIG, seed=1), train, result.embeddings_dir.parent)
