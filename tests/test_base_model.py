"""Base models resolve offline: built-in random models, local folders, and a clear hub error."""

import re
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from skindiff.data.fitzpatrick import CONDITIONS
from skindiff.diffusion import base_model
from skindiff.diffusion.base_model import (
    base_model_fingerprint,
    build_builtin_pipeline,
    resolve_base_model,
)
from skindiff.diffusion.tokenizer import PROMPT_TEXTS, build_offline_tokenizer
from skindiff.errors import SkindiffError


def test_tiny_random_is_built_once_into_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    folder = resolve_base_model("tiny-random")
    assert (folder / "model_index.json").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert pipe.tokenizer.model_max_length == 77
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    image = pipe(
        "a photo of psoriasis",
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.shape == (64, 64, 3)
    # Built once, then re-used: a second resolve neither builds nor rewrites anything.
    before = {path: path.stat().st_mtime_ns for path in folder.rglob("*")}

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the tiny-random model was built again")

    monkeypatch.setattr(base_model, "build_builtin_pipeline", no_rebuild)
    assert resolve_base_model("tiny-random") == folder
    assert {path: path.stat().st_mtime_ns for path in folder.rglob("*")} == before


def test_tiny_is_the_shipped_pretrained_tiny_random_architecture(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_build(*args, **kwargs):
        raise AssertionError("the shipped tiny model must not be built")

    monkeypatch.setattr(base_model, "build_builtin_pipeline", no_build)
    shipped = StableDiffusionPipeline.from_pretrained(resolve_base_model("tiny"))
    monkeypatch.undo()
    random = build_builtin_pipeline("tiny-random")
    for name in ("unet", "vae", "text_encoder"):
        trained = dict(getattr(shipped, name).named_parameters())
        initial = dict(getattr(random, name).named_parameters())
        assert {k: t.shape for k, t in trained.items()} == {k: t.shape for k, t in initial.items()}
        changed = [key for key, tensor in initial.items() if not torch.equal(tensor, trained[key])]
        assert len(changed) > 0.9 * len(initial), f"{name}: only {len(changed)} tensors trained"
    # The code's offline tokenizer is the one the model was trained with.
    assert shipped.tokenizer.get_vocab() == build_offline_tokenizer().get_vocab()
    assert shipped.vae.config.scaling_factor != 0.18215  # set from the corpus's latents


def test_tiny_weights_follow_the_seed() -> None:
    a = build_builtin_pipeline("tiny-random", seed=0)
    b = build_builtin_pipeline("tiny-random", seed=0)
    c = build_builtin_pipeline("tiny-random", seed=1)
    for name, tensor in a.unet.state_dict().items():
        assert torch.equal(tensor, b.unet.state_dict()[name]), name
    assert not torch.equal(a.unet.conv_in.weight, c.unet.conv_in.weight)


def test_prompt_words_are_single_tokens() -> None:
    tokenizer = build_builtin_pipeline("tiny-random").tokenizer
    ids = tokenizer("An image of psoriasis on the skin of a very dark-skinned individual").input_ids
    words = [
        "an",
        "image",
        "of",
        "psoriasis",
        "on",
        "the",
        "skin",
        "of",
        "a",
        "very",
        "dark",
        "-",
        "skinned",
        "individual",
    ]
    assert tokenizer.convert_ids_to_tokens(ids) == [
        tokenizer.bos_token,
        *(f"{word}</w>" for word in words),
        tokenizer.eos_token,
    ]
    # Every word of every prompt text and condition is one whole-word token.
    every_word = set(re.findall(r"[a-z]+", " ".join((*PROMPT_TEXTS, *CONDITIONS)).lower()))
    assert every_word
    for word in sorted(every_word):
        assert tokenizer.tokenize(word) == [f"{word}</w>"], word


# Parameter counts of the published Stable Diffusion 2.1-base components.
SD21_BASE_PARAMETERS = {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840}


def test_sd21_random_has_the_real_architecture() -> None:
    with torch.device("meta"):  # shapes only: no memory, no time
        pipe = build_builtin_pipeline("sd21-random")
    counts = {
        name: sum(p.numel() for p in getattr(pipe, name).parameters())
        for name in SD21_BASE_PARAMETERS
    }
    assert counts == SD21_BASE_PARAMETERS
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 512


def test_local_folder_is_used_as_is_and_fingerprinted(tmp_path: Path) -> None:
    tiny = resolve_base_model("tiny")
    assert resolve_base_model(str(tiny)) == tiny
    fingerprint = base_model_fingerprint(tiny)
    assert fingerprint == base_model_fingerprint(tiny)
    assert fingerprint != base_model_fingerprint(resolve_base_model("tiny-random"))


def test_folder_that_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(SkindiffError, match="not a diffusers folder"):
        resolve_base_model(str(tmp_path))


def test_unreachable_hub_id_says_how_to_use_a_local_copy() -> None:
    with pytest.raises(SkindiffError) as err:
        resolve_base_model("stabilityai/stable-diffusion-2-1-base")
    message = str(err.value)
    assert "not reachable" in message or "neither a local folder" in message
    assert "--local-dir DIR" in message and "base_model=DIR" in message
    assert "\n" not in message
