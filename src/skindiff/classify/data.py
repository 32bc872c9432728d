"""Classifier inputs: the training set (real, synthetic or both), images as tensors, the sampler.

Transforms follow the reference code at `image_size` = 224: train RandomResizedCrop(256, scale
0.8-1.0), RandomRotation(15), RandomHorizontalFlip(), CenterCrop(224); test Resize(256),
CenterCrop(224); both ImageNet-normalised. Other sizes keep the ratio 256/224. The reference's
`ColorJitter()` is left out: with its default arguments it changes nothing.
"""

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset, WeightedRandomSampler
from torchvision import transforms
from torchvision.transforms import functional as F
from tqdm.auto import tqdm

from skindiff.classify.config import TrainType
from skindiff.core.manifest import image_rows
from skindiff.core.seeding import seeded_generator
from skindiff.core.settings import coerce
from skindiff.data.images import load_rgb
from skindiff.errors import SkindiffError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_size(image_size: int) -> int:
    """Side the images are resized to before the `image_size` crop (256 for 224)."""
    return round(image_size * 256 / 224)


def train_transform(image_size: int) -> transforms.Compose:
    """The reference's training transforms of a decoded file, to a normalised float tensor."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(resize_size(image_size), scale=(0.8, 1.0)),
            transforms.RandomRotation(15),
            transforms.RandomHorizontalFlip(),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def eval_transform(image_size: int) -> transforms.Compose:
    """The reference's test transforms of a decoded file, to a normalised float tensor."""
    return transforms.Compose(
        [
            _resize(resize_size(image_size)),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def _resize(side: int) -> transforms.Resize:
    """The test-time Resize: decode_all shrinks images with it too, so that it then leaves them
    as they are."""
    return transforms.Resize(side)


def memory_format_on(device: torch.device) -> torch.memory_format:
    """The layout of the classifier's images and weights: channels-last on a CPU, where oneDNN's
    convolutions, pooling and batch norm take it about 10% faster (a tiny CNN's training step,
    measured); as they come on a GPU, where it was not measured."""
    return torch.channels_last if device.type == "cpu" else torch.preserve_format


def to_model_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch of ManifestDataset's uint8 images on `device`, scaled and normalised as
    ToTensor and Normalize do it: on a CPU the same floats, bit for bit (laid out as
    memory_format_on says)."""
    images = images.to(device, non_blocking=True)
    images = images.to(torch.float32, memory_format=memory_format_on(device)).div_(255)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(-1, 1, 1)
    return images.sub_(mean).div_(std)


def class_indices(rows: pd.DataFrame, labels: Sequence[str], name: str) -> list[int]:
    """Each row's class index (its label's position in `labels`)."""
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted(set(rows["label"]) - set(index))
    if unknown:
        raise SkindiffError(
            f"{name}: label(s) {', '.join(map(repr, unknown))} not among the classifier's labels"
        )
    return [index[label] for label in rows["label"]]


class ManifestDataset(Dataset):
    """(uint8 image tensor, class index) for each manifest row; `path` must be absolute.

    An item is train_transform's (`augment`) or eval_transform's output but for ToTensor and
    Normalize, which `to_model_input` applies to a whole batch on the device: a uint8 batch is
    a quarter of the bytes to collate and copy.

    Each item decodes its file, unless `decode_all` decoded every file once before, keeping it
    as uint8 RGB with its shorter side shrunk to resize_size(image_size) by eval_transform's
    Resize. That costs 3 bytes per kept pixel: at image_size 224, 197 MB per 1,000 square
    images, 262 MB per 1,000 4:3 ones. Evaluation items stay the same, bit for bit: the Resize
    then leaves a shrunk image as it is. A training item of a shrunk image differs only by
    interpolation: its random crop, drawn on the file's size with the same random numbers, is
    cut from the shrunk image at the nearest whole pixels and resized by torch's uint8 kernel,
    which resamples the file twice. That moves pixels by under 3 grey levels of 255 on average
    even on images with strong pixel noise, the worst case (tests/test_classifier_cache.py).
    Images not larger than resize_size(image_size), such as 256 px synthetic ones at 224, are
    kept as decoded and their items are the same bit for bit.
    """

    def __init__(
        self,
        rows: pd.DataFrame,
        labels: Sequence[str],
        image_size: int,
        name: str,
        augment: bool = False,
    ):
        rows = image_rows(rows, name)
        absent = [p for p in rows["path"] if not Path(p).is_file()]
        if absent:
            raise SkindiffError(
                f"{name}: {len(absent)} of {len(rows)} image file(s) not found, e.g. {absent[0]}"
            )
        self.name = name
        self.paths = list(rows["path"])
        self.targets = class_indices(rows, labels, name)
        self.side = resize_size(image_size)
        reference = (train_transform if augment else eval_transform)(image_size).transforms
        steps = reference[:-2]  # without ToTensor and Normalize: to_model_input does them
        self.crop = steps.pop(0) if augment else None
        self.steps = transforms.Compose([*steps, transforms.PILToTensor()])
        self.images: list[tuple[np.ndarray, tuple[int, int]]] | None = None

    def decode_all(self, progress: bool = False) -> None:
        """Decodes every file now, once, for a dataset read every epoch (see the class)."""
        # PIL releases the GIL while it decodes and resizes.
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            decoded = pool.map(partial(_decode_shrunk, side=self.side), self.paths)
            self.images = list(
                tqdm(
                    decoded,
                    total=len(self.paths),
                    desc=f"decoding {self.name} images",
                    unit="img",
                    disable=not progress,
                    delay=1,  # shown only when decoding takes a while
                )
            )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.images is None:
            image = load_rgb(Path(self.paths[i]))
        else:
            pixels, file_size = self.images[i]
            if self.crop is not None and pixels.shape[1::-1] != file_size:
                return self.steps(self._crop_shrunk(pixels, file_size)), self.targets[i]
            image = Image.fromarray(pixels)
        if self.crop is not None:
            crop = self.crop
            image = F.resized_crop(
                image,
                *self._crop_box(image.size),
                crop.size,
                crop.interpolation,
                antialias=crop.antialias,
            )
        return self.steps(image), self.targets[i]

    def _crop_box(self, file_size: tuple[int, int]) -> tuple[int, int, int, int]:
        """RandomResizedCrop's random box (top, left, height, width) on a file of `file_size`."""
        width, height = file_size
        # get_params reads only its argument's size, which an empty tensor has for free.
        return self.crop.get_params(torch.empty(0, height, width), self.crop.scale, self.crop.ratio)

    def _crop_shrunk(self, pixels: np.ndarray, file_size: tuple[int, int]) -> Image.Image:
        """RandomResizedCrop of a file from its shrunk pixels: the box drawn on the file's size,
        rounded to the shrunk pixels, resized by torch's antialiased bilinear kernel for uint8
        (a port of PIL's; 3.5x faster than PIL's resize of a fractional box)."""
        i, j, h, w = self._crop_box(file_size)
        x, y = pixels.shape[1] / file_size[0], pixels.shape[0] / file_size[1]
        top, left = round(i * y), round(j * x)
        bottom, right = max(top + 1, round((i + h) * y)), max(left + 1, round((j + w) * x))
        box = torch.from_numpy(pixels).permute(2, 0, 1)[None, :, top:bottom, left:right]
        # Copied channels-last (as the pixels lie), which the kernel takes twice as fast as the
        # strided view, and gives back channels-last: the H x W x 3 view below is contiguous.
        resized = torch.nn.functional.interpolate(
            box.contiguous(memory_format=torch.channels_last),
            size=self.crop.size,
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
        return Image.fromarray(resized[0].permute(1, 2, 0).numpy())


def _decode_shrunk(path: str, side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """(uint8 H x W x 3 pixels, shorter side at most `side`; the file's width and height)."""
    image = load_rgb(Path(path))
    file_size = image.size
    if min(file_size) > side:
        image = _resize(side)(image)
    return np.array(image), file_size  # writable, so that torch can view it


def build_training_set(
    train: pd.DataFrame, synthetic: pd.DataFrame | None, train_type: TrainType | str
) -> pd.DataFrame:
    """The classifier's training rows for `train_type`, with a `source` column (real/synthetic).
    Synthetic rows with `kept` false (see the generate stage's skin_tone_filter) are left out.

    Refuses synthetic images made from anything but this training split: the synthetic child of
    a validation or test image would leak that image into training.
    """
    train_type = coerce(TrainType, "train_type", train_type)
    real = image_rows(train, "train").assign(source="real")
    if train_type == TrainType.REAL:
        return real
    if synthetic is None:
        raise SkindiffError(
            f"train_type={train_type!r} needs a synthetic manifest (from the generate stage); "
            "use train_type='real' without one"
        )
    if "kept" in synthetic.columns:  # what skin_tone_filter left out is not trained on
        synthetic = synthetic[synthetic["kept"].astype(str).str.lower() == "true"]
    fake = image_rows(synthetic, "synthetic").assign(source="synthetic")
    if fake.empty:
        raise SkindiffError(
            f"train_type={train_type!r}: the synthetic manifest has no rows"
            + (" kept by skin_tone_filter" if "kept" in synthetic.columns else "")
        )
    leaked = fake.loc[~fake["md5hash"].isin(set(real["md5hash"])), "md5hash"]
    if len(leaked):
        raise SkindiffError(
            f"synthetic: {len(leaked)} of {len(fake)} rows were generated from images outside "
            f"the training split (e.g. md5hash {leaked.iloc[0]}), which leaks validation or test "
            "images into training; generate from this scenario's training split"
        )
    parts = [fake] if train_type == TrainType.SYN else [real, fake]
    return pd.concat(parts, ignore_index=True)


def weighted_sampler(rows: pd.DataFrame, labels: Sequence[str], seed: int) -> WeightedRandomSampler:
    """Draws len(rows) rows per epoch with replacement, each with weight 1 / its class's count,
    so every class is drawn about equally often (the reference's class balancing)."""
    targets = torch.tensor(class_indices(rows, labels, "train"))
    counts = torch.bincount(targets, minlength=len(labels)).double()
    return WeightedRandomSampler(
        1.0 / counts[targets],
        num_samples=len(targets),
        replacement=True,
        generator=seeded_generator("classifier-sampler", seed),
    )
