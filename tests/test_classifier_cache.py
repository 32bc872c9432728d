"""The classifier's decode-once images against the reference transforms of each decoded file."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from skindiff.classify.data import (
    IMAGENET_STD,
    ManifestDataset,
    eval_transform,
    resize_size,
    to_model_input,
    train_transform,
)
from skindiff.data.demo import draw_lesion_image
from skindiff.data.images import load_rgb

IMAGE_SIZE = 224
SIDE = resize_size(IMAGE_SIZE)
# (width, height): shrunk by 2, by 1.5, barely (the largest difference), and kept as decoded.
SHRUNK = [(1024, 768), (384, 512), (300, 260)]
KEPT = [(256, 256), (200, 150)]
TOLERANCE = 3.0  # grey levels of 255: ManifestDataset's docstring
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> pd.DataFrame:
    """Skin images with pixel noise, the worst case for interpolation, as JPEGs and a PNG."""
    folder = tmp_path_factory.mktemp("images")
    rows = []
    for k, (width, height) in enumerate(SHRUNK + KEPT):
        rng = np.random.default_rng(k)
        drawn = draw_lesion_image("psoriasis", 5, rng, max(width, height))
        pixels = np.asarray(drawn.crop((0, 0, width, height)), dtype=float)
        noisy = np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)
        path = folder / f"{k}.{'png' if (width, height) == (256, 256) else 'jpg'}"
        Image.fromarray(noisy).save(path, quality=90)
        rows.append({"md5hash": f"m{k}", "label": "a", "path": str(path)})
    return pd.DataFrame(rows).assign(fitzpatrick_scale=5, group="dark")


def decoded(rows: pd.DataFrame, augment: bool) -> ManifestDataset:
    dataset = ManifestDataset(rows, ("a", "b"), IMAGE_SIZE, "images", augment=augment)
    dataset.decode_all()
    return dataset


def item(dataset: ManifestDataset, i: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return to_model_input(dataset[i][0][None], CPU)[0]


def reference(transform, path: str, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return transform(load_rgb(Path(path)))


def grey_levels(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute difference of two normalised images, in grey levels of 255."""
    return ((a - b).abs() * torch.tensor(IMAGENET_STD).view(-1, 1, 1)).mean().item() * 255


def test_decoded_images_are_shrunk_uint8_and_no_longer_read(images, tmp_path):
    rows = images.assign(path=[str(tmp_path / Path(p).name) for p in images["path"]])
    for source, copy in zip(images["path"], rows["path"], strict=True):
        Path(copy).write_bytes(Path(source).read_bytes())
    dataset = decoded(rows, augment=False)
    for path in rows["path"]:
        Path(path).unlink()
    for (pixels, file_size), size in zip(dataset.images, SHRUNK + KEPT, strict=True):
        assert file_size == size and pixels.dtype == np.uint8
        assert min(pixels.shape[:2]) == min(SIDE, *size)
    assert [tuple(dataset[i][0].shape) for i in range(len(rows))] == [(3, 224, 224)] * len(rows)


def test_evaluation_items_are_the_reference_bit_for_bit(images):
    streamed = ManifestDataset(images, ("a", "b"), IMAGE_SIZE, "images")
    cached = decoded(images, augment=False)
    transform = eval_transform(IMAGE_SIZE)
    for i, path in enumerate(images["path"]):
        expected = reference(transform, path, seed=0)
        assert torch.equal(item(cached, i, seed=0), expected), path
        assert torch.equal(item(streamed, i, seed=0), expected), path


def test_training_items_differ_from_the_reference_only_by_interpolation(images):
    streamed = ManifestDataset(images, ("a", "b"), IMAGE_SIZE, "images", augment=True)
    cached = decoded(images, augment=True)
    transform = train_transform(IMAGE_SIZE)
    worst = 0.0
    for i, path in enumerate(images["path"]):
        for seed in range(8):
            expected = reference(transform, path, seed)
            assert torch.equal(item(streamed, i, seed), expected), path
            if i < len(SHRUNK):
                worst = max(worst, grey_levels(item(cached, i, seed), expected))
            else:
                assert torch.equal(item(cached, i, seed), expected), path
    assert 0 < worst < TOLERANCE
    # The bound tells images apart: another image, with the same draws, is far from it.
    other = reference(transform, images["path"].iloc[1], seed=0)
    assert grey_levels(item(cached, 0, seed=0), other) > 5 * TOLERANCE
