"""Pretraining the `tiny` architecture on the procedural skin corpus (a few steps)."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline

from conftest import sample_image
from skindiff.data.fitzpatrick import CONDITIONS
from skindiff.diffusion.base_model import resolve_base_model
from skindiff.diffusion.config import PretrainConfig, PretrainTarget
from skindiff.diffusion.pretrain import pretrain_base_model
from skindiff.diffusion.prompts import SKIN_TYPE_PHRASES
from skindiff.diffusion.skin_corpus import draw_corpus_image
from skindiff.errors import SkindiffError

QUICK = PretrainConfig(corpus_size=32, vae_steps=2, unet_steps=2, batch_size=4)


def weights(folder: Path) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in folder.glob("*/*.safetensors")}


def test_same_seed_same_weights_and_a_loadable_base_model(tmp_path: Path) -> None:
    first = pretrain_base_model(QUICK, tmp_path / "a")
    assert weights(first) == weights(pretrain_base_model(QUICK, tmp_path / "b"))
    other = weights(pretrain_base_model(replace(QUICK, seed=1), tmp_path / "c"))
    assert all(other[part] != weights(first)[part] for part in ("unet", "vae", "text_encoder"))
    # The pretraining changed the random model, and the folder is a base model like any other.
    random = weights(resolve_base_model("tiny"))
    assert weights(first)["unet"] != random["unet"]
    pipe = StableDiffusionPipeline.from_pretrained(
        resolve_base_model(str(first)), safety_checker=None, requires_safety_checker=False
    )
    image = sample_image(pipe, "An image of a mole on the skin of a dark-skinned individual")[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()


def test_the_corpus_covers_every_skin_type_and_no_study_condition() -> None:
    drawn = [draw_corpus_image(0, index, 64) for index in range(300)]
    captions = " ".join(caption for _, caption, _ in drawn).lower()
    assert not [condition for condition in CONDITIONS if condition in captions]
    assert {fst for _, _, fst in drawn} == set(SKIN_TYPE_PHRASES)
    for image, caption, fst in drawn[:20]:
        assert caption.endswith(f"{SKIN_TYPE_PHRASES[fst]} individual")
        assert image.size == (64, 64)
    # The skin tone follows the type: the darkest types are darker on average.
    mean = {f: np.mean([np.asarray(i).mean() for i, _, t in drawn if t == f]) for f in (1, 6)}
    assert mean[1] > mean[6] + 80
    # Same seed and index, same image; the stream differs by index.
    again = draw_corpus_image(0, 0, 64)[0]
    assert np.array_equal(np.asarray(again), np.asarray(drawn[0][0]))
    assert not np.array_equal(np.asarray(drawn[1][0]), np.asarray(drawn[0][0]))


def test_bad_settings_are_refused() -> None:
    with pytest.raises(SkindiffError, match="vae_steps must be at least 1"):
        PretrainConfig(vae_steps=0)
    with pytest.raises(SkindiffError, match="caption_dropout must be in"):
        PretrainConfig(caption_dropout=1.5)
    with pytest.raises(SkindiffError, match="output_dir is empty"):
        PretrainTarget()
