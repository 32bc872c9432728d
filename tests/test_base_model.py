"""Base models resolve offline: built-in random models, local folders, and a clear hub error."""

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from skindiff.diffusion.base_model import (
    base_model_fingerprint,
    build_builtin_pipeline,
    resolve_base_model,
)
from skindiff.errors import SkindiffError


def test_tiny_is_a_diffusers_folder_that_loads_and_generates() -> None:
    folder = resolve_base_model("tiny")
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
    assert resolve_base_model("tiny") == folder  # built once, then re-used


def test_tiny_weights_follow_the_seed() -> None:
    a, b = build_builtin_pipeline("tiny", seed=0), build_builtin_pipeline("tiny", seed=0)
    c = build_builtin_pipeline("tiny", seed=1)
    for name, tensor in a.unet.state_dict().items():
        assert torch.equal(tensor, b.unet.state_dict()[name]), name
    assert not torch.equal(a.unet.conv_in.weight, c.unet.conv_in.weight)


def test_prompt_words_are_single_tokens() -> None:
    tokenizer = build_builtin_pipeline("tiny").tokenizer
    ids = tokenizer("An image of psoriasis on the skin of a very dark-skinned individual").input_ids
    assert len(ids) == 16  # bos + 14 words and the hyphen + eos: no word split into pieces


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
    assert fingerprint != base_model_fingerprint(resolve_base_model("tiny").parent)


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
