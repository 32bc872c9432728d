"""Classifier inputs: the training set (real, synthetic or both), images as tensors, the sampler.

Transforms follow the reference code at `image_size` = 224: train RandomResizedCrop(256, scale
0.8-1.0), RandomRotation(15), RandomHorizontalFlip(), CenterCrop(224); test Resize(256),
CenterCrop(224); both ImageNet-normalised. Other sizes keep the ratio 256/224. The reference's
`ColorJitter()` is left out: with its default arguments it changes nothing.
"""

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import Dataset, WeightedRandomSampler
from torchvision import transforms

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
    return transforms.Compose(
        [
            transforms.Resize(resize_size(image_size)),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


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
    """(image tensor, class index) for each manifest row; `path` must be absolute."""

    def __init__(
        self, rows: pd.DataFrame, labels: Sequence[str], transform: transforms.Compose, name: str
    ):
        rows = image_rows(rows, name)
        absent = [p for p in rows["path"] if not Path(p).is_file()]
        if absent:
            raise SkindiffError(
                f"{name}: {len(absent)} of {len(rows)} image file(s) not found, e.g. {absent[0]}"
            )
        self.paths = list(rows["path"])
        self.targets = class_indices(rows, labels, name)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(load_rgb(Path(self.paths[i]))), self.targets[i]


def build_training_set(
    train: pd.DataFrame, synthetic: pd.DataFrame | None, train_type: TrainType | str
) -> pd.DataFrame:
    """The classifier's training rows for `train_type`, with a `source` column (real/synthetic).

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
    fake = image_rows(synthetic, "synthetic").assign(source="synthetic")
    if fake.empty:
        raise SkindiffError(f"train_type={train_type!r}: the synthetic manifest has no rows")
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
