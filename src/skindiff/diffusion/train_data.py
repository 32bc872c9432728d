"""Training images for Textual Inversion and LoRA: an endless, seeded stream of augmented draws.

Item `d` of the dataset is draw number `d` of a stream that visits the rows in a fresh shuffled
order every epoch. The row and the augmentation of a draw depend only on (seed, d), so a run
resumed at draw `d` sees exactly what an uninterrupted run would, whatever the number of
DataLoader workers.
"""

from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from skindiff.core.manifest import IMAGE_COLUMNS, require_columns
from skindiff.core.seeding import seeded_generator
from skindiff.data.images import load_rgb
from skindiff.errors import SkindiffError

Transform = Literal["ti", "lora"]
TRANSFORMS: tuple[Transform, ...] = ("ti", "lora")
# The reference's Textual Inversion script resizes bicubic, its LoRA script bilinear.
RESAMPLING = {"ti": Image.Resampling.BICUBIC, "lora": Image.Resampling.BILINEAR}


def check_training_rows(train: pd.DataFrame) -> pd.DataFrame:
    """`train` with a fresh index, after refusing an empty set, missing columns or files."""
    require_columns(train, IMAGE_COLUMNS, "train")
    if train.empty:
        raise SkindiffError("train is empty: there is nothing to train on")
    absent = [p for p in train["path"] if not Path(p).is_file()]
    if absent:
        raise SkindiffError(
            f"train: {len(absent)} image file(s) not found, e.g. {absent[0]}; "
            "prepare the data again"
        )
    return train.reset_index(drop=True)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """HWC uint8 image -> CHW float in [-1, 1], the range the VAE was trained on."""
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return array.permute(2, 0, 1).float() / 127.5 - 1.0


class ManifestImageDataset(Dataset):
    """Augmented training images of manifest rows, indexed by draw number (see module doc).

    `transform` follows the reference scripts:
    - "ti": bicubic resize of the whole image to resolution x resolution, horizontal flip p=0.5;
    - "lora": bilinear resize of the shorter side to resolution, random square crop, and a
      horizontal flip p=0.5 (lesion photos have no left or right, so a flip keeps label and
      skin type while doubling the variety a few dozen images offer).
    `len()` is one epoch; any non-negative index is valid. Draws whose key is among
    `skip_pixels_of`'s come without pixels (None): the trainer already has their encoding.
    """

    def __init__(self, rows: pd.DataFrame, resolution: int, transform: Transform, seed: int):
        if transform not in TRANSFORMS:
            raise SkindiffError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
        if resolution < 1:
            raise SkindiffError(f"resolution must be positive, got {resolution}")
        rows = check_training_rows(rows)
        self.paths = list(rows["path"])
        self.conditions = list(rows["label"])
        self.skin_types = [int(fst) for fst in rows["fitzpatrick_scale"]]
        self.resolution = resolution
        self.transform = transform
        self.seed = seed
        self._skipped_keys: frozenset[str] = frozenset()
        self._file_sizes: dict[int, tuple[int, int]] = {}

    def skip_pixels_of(self, keys: frozenset[str]) -> None:
        """Draws with these keys leave their pixels out (None), so no time goes into decoding
        an image whose encoding the trainer remembers."""
        self._skipped_keys = keys

    def __len__(self) -> int:
        return len(self.paths)

    def row_of(self, draw: int) -> int:
        """Row shown at `draw`: epoch `draw // len` is a permutation seeded by (seed, epoch)."""
        epoch, position = divmod(draw, len(self))
        order = torch.randperm(len(self), generator=seeded_generator("order", self.seed, epoch))
        return int(order[position])

    def __getitem__(self, draw: int) -> dict:
        if draw < 0:
            raise IndexError(draw)
        row = self.row_of(draw)
        generator = seeded_generator("augment", self.seed, draw)
        top = left = 0
        if self.transform == "lora":
            width, height = self._resized_size(self._file_size(row))
            top = int(torch.randint(height - self.resolution + 1, (1,), generator=generator))
            left = int(torch.randint(width - self.resolution + 1, (1,), generator=generator))
        flip = torch.rand(1, generator=generator).item() < 0.5
        key = self._key(row, top, left, flip)
        skipped = key in self._skipped_keys
        return {
            "pixel_values": None if skipped else self._pixels(self._image(row), top, left, flip),
            "key": key,
            "condition": self.conditions[row],
            "fitzpatrick_scale": self.skin_types[row],
        }

    def fixed_images(self) -> list[tuple[str, int, bool]]:
        """(key, row, flip) of every augmented image whose crop is fixed: all of "ti"'s, and
        "lora"'s of images that resize to a square. Their draws repeat, so encoding each once
        up front saves an encoding per draw."""
        fixed = []
        for row in range(len(self.paths)):
            if self.transform == "lora":
                width, height = self._file_size(row)
                if width != height:
                    continue
            fixed += [(self._key(row, 0, 0, flip), row, flip) for flip in (False, True)]
        return fixed

    def fixed_image(self, row: int, flip: bool) -> torch.Tensor:
        """The pixels of a draw of `row` with the fixed crop (see `fixed_images`)."""
        return self._pixels(self._image(row), 0, 0, flip)

    def _file_size(self, row: int) -> tuple[int, int]:
        """(width, height) of a row's file, read from its header once."""
        if row not in self._file_sizes:
            with Image.open(self.paths[row]) as image:
                self._file_sizes[row] = image.size
        return self._file_sizes[row]

    def _image(self, row: int) -> Image.Image:
        return load_rgb(Path(self.paths[row]))

    def _key(self, row: int, top: int, left: int, flip: bool) -> str:
        """Names a draw's pixels, in any dataset: draws with the same key are the same image."""
        return f"{self.paths[row]}:{top},{left},{'flip' if flip else 'asis'}"

    def _resized_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) an image of `size` is resized to before its crop."""
        side = self.resolution
        if self.transform == "ti":
            return side, side
        scale = side / min(size)
        return max(side, round(size[0] * scale)), max(side, round(size[1] * scale))

    def _pixels(self, image: Image.Image, top: int, left: int, flip: bool) -> torch.Tensor:
        """The augmented image: resized, cropped at (top, left), flipped or not."""
        side = self.resolution
        resized = image.resize(self._resized_size(image.size), RESAMPLING[self.transform])
        pixels = _to_tensor(resized)
        pixels = pixels[:, top : top + side, left : left + side]
        return pixels.flip(-1) if flip else pixels


def collate_draws(draws: list[dict]) -> dict:
    """A batch of draws, their pixels as a list (a skipped draw's are None)."""
    return {
        "pixel_values": [draw["pixel_values"] for draw in draws],
        "key": [draw["key"] for draw in draws],
        "condition": [draw["condition"] for draw in draws],
        "fitzpatrick_scale": torch.tensor([draw["fitzpatrick_scale"] for draw in draws]),
    }
