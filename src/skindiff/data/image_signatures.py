"""What near-duplicate images are compared by: a perceptual hash and a few feature vectors per
image, computed once per file content and cached.

- **pHash** (imagehash's, 64 bits): robust to re-encoding and resizing; two copies differ by a
  few bits, two photographs by about 32.
- **thumbnails**: 12 x 12 grey thumbnails, robustly standardised (median and MAD, clipped at
  2.5, so a watermark's few bright pixels weigh little), of the whole image and of 18 crops of
  it (95% and 90% of each side, at 9 positions each). A copy cropped by up to about 10% matches
  one of the crops; a uniform brightness or contrast change does not move them at all.
- **resnet18**: ImageNet ResNet-18's 512 pooled features of the whole image (the network and
  weights file of the synthetic-quality measures and of `weights auto`), which also see
  through crops and colour shifts; one vector per image.
"""

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn
from torchvision import models
from tqdm.auto import tqdm

from skindiff.core.files import cache_dir, cached_arrays
from skindiff.data.config import DuplicateFeatures
from skindiff.errors import SkindiffError

SIGNATURES_DIR = "near-duplicates"
THUMBNAIL_SIDE = 12
CLIP = 2.5  # robust z-scores beyond this are clipped: a watermark or a glare weighs little
CROP_SCALES = (0.95, 0.9)
RESNET18 = models.ResNet18_Weights.IMAGENET1K_V1
BATCH_SIZE = 32
# cache folders named by what their arrays depend on, so a change of definition starts afresh
THUMBNAILS_CACHE = (
    f"thumbnails-{THUMBNAIL_SIDE}px-clip{CLIP}-crops{'-'.join(map(str, CROP_SCALES))}"
)
PHASH_CACHE = "phash-64bit"
RESNET18_CACHE = f"resnet18-{Path(RESNET18.url).stem}"


def open_small(path: str | Path, side: int) -> Image.Image:
    """The image decoded at the smallest JPEG scale whose sides are still at least `side`
    (a 600 x 450 photo for a 64-pixel thumbnail decodes at 1/8: a few times faster)."""
    image = Image.open(path)
    image.draft("RGB", (side, side))
    return image.convert("RGB")


def thumbnail(image: Image.Image) -> np.ndarray:
    """The image as a 12 x 12 grey thumbnail, robustly standardised, of unit length."""
    grey = image.convert("L").resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BOX)
    values = np.asarray(grey, dtype=np.float32).ravel()
    values = values - np.median(values)
    spread = 1.4826 * np.median(np.abs(values)) + 1e-3  # the MAD, as a standard deviation
    values = np.clip(values / spread, -CLIP, CLIP)
    values = values - values.mean()
    return values / (np.linalg.norm(values) + 1e-6)


def crop_boxes(width: int, height: int) -> list[tuple[int, int, int, int]]:
    """The 18 crops the thumbnails also see: each scale at the 3 x 3 grid of positions."""
    boxes = []
    for scale in CROP_SCALES:
        w, h = round(scale * width), round(scale * height)
        for x in (0, (width - w) // 2, width - w):
            boxes += [(x, y, x + w, y + h) for y in (0, (height - h) // 2, height - h)]
    return boxes


def thumbnail_views(image: Image.Image) -> np.ndarray:
    """(19, 256): the whole image's thumbnail first, then its crops'."""
    crops = [image.crop(box) for box in crop_boxes(*image.size)]
    return np.stack([thumbnail(image)] + [thumbnail(crop) for crop in crops])


def pixel_thumbnails(paths: Sequence[str | Path]) -> np.ndarray:
    """(images, 256): each image's whole thumbnail."""
    return np.stack([thumbnail(open_small(path, 4 * THUMBNAIL_SIDE)) for path in paths])


def perceptual_hash(image: Image.Image) -> np.uint64:
    bits = imagehash.phash(image).hash.ravel()
    return np.uint64(int("".join("1" if bit else "0" for bit in bits), 2))


def _hash_and_thumbnails(path: str) -> tuple[np.uint64, np.ndarray]:
    image = open_small(path, 4 * THUMBNAIL_SIDE)
    return perceptual_hash(image), thumbnail_views(image)


def resnet18_file() -> Path:
    """Where torchvision keeps ResNet-18's ImageNet weights (the torch hub checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(RESNET18.url).name


def require_features(features: DuplicateFeatures) -> None:
    """Refuses resnet18 features without their weights file: one error saying where to fetch
    it (nothing is downloaded), before any image is read."""
    path = resnet18_file()
    if resolve_features(features) == DuplicateFeatures.RESNET18 and not path.is_file():
        raise SkindiffError(
            f"near_duplicate_features resnet18: the weights file {path} is missing (nothing is "
            f"downloaded): fetch {RESNET18.url} into {path.parent}, or use "
            "--near-duplicate-features thumbnails"
        )


def resnet18_backbone() -> nn.Module:
    """ImageNet ResNet-18 up to its pooled features, from the weights file."""
    require_features(DuplicateFeatures.RESNET18)
    model = models.resnet18()
    model.load_state_dict(torch.load(resnet18_file(), map_location="cpu", weights_only=True))
    model.fc = nn.Identity()
    return model.eval()


@torch.inference_mode()
def backbone_features(paths: Sequence[str], backbone: nn.Module) -> np.ndarray:
    """(images, 1, features): `backbone` on each image with ImageNet's evaluation transforms."""
    transform = RESNET18.transforms()
    batches = []
    for start in range(0, len(paths), BATCH_SIZE):
        images = [transform(open_small(p, 256)) for p in paths[start : start + BATCH_SIZE]]
        batches.append(backbone(torch.stack(images)).float().numpy())
    return np.concatenate(batches)[:, None, :]


def resolve_features(features: DuplicateFeatures) -> DuplicateFeatures:
    """`auto`: resnet18 where its weights file is present, else thumbnails."""
    if features == DuplicateFeatures.AUTO:
        present = resnet18_file().is_file()
        return DuplicateFeatures.RESNET18 if present else DuplicateFeatures.THUMBNAILS
    return features


def _in_threads(work: Callable[[str], object], paths: Sequence[str], what: str) -> list:
    # decoding and resizing release the GIL: threads use every core the policy gives
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(work, paths), total=len(paths), desc=what, unit="img"))


def image_signatures(
    rows: pd.DataFrame,
    features: DuplicateFeatures,
    backbone: Callable[[], nn.Module] = resnet18_backbone,
) -> tuple[np.ndarray, np.ndarray]:
    """(hashes, views) of the images of `rows` (columns path and sha256): each image's pHash
    (uint64) and its (views, dimensions) feature vectors, cached by content."""
    features = resolve_features(features)
    paths = rows["path"].astype(str).tolist()
    digests = rows["sha256"].astype(str).tolist()
    folder = cache_dir() / SIGNATURES_DIR

    done: dict[tuple[int, ...], list] = {}

    def hashed(missing: list[int]) -> list:
        # the hash and the thumbnails come from one decoding; both caches miss together
        if tuple(missing) not in done:
            done[tuple(missing)] = _in_threads(
                _hash_and_thumbnails, [paths[i] for i in missing], "hashing images"
            )
        return done[tuple(missing)]

    hashes = cached_arrays(
        folder / PHASH_CACHE, digests, lambda missing: [np.uint64(h) for h, _ in hashed(missing)]
    )
    if features == DuplicateFeatures.THUMBNAILS:
        views = cached_arrays(
            folder / THUMBNAILS_CACHE, digests, lambda missing: [v for _, v in hashed(missing)]
        )
    else:
        views = cached_arrays(
            folder / RESNET18_CACHE,
            digests,
            lambda missing: backbone_features([paths[i] for i in missing], backbone()),
        )
    return hashes.astype(np.uint64), views.astype(np.float32)
