"""Classifier epochs: a plain torchvision data path against skindiff's, which decodes once.

Baseline: a Dataset that decodes each JPEG with PIL and applies the reference transforms
(RandomResizedCrop(256, scale 0.8-1.0), RandomRotation(15), RandomHorizontalFlip,
CenterCrop(224), ToTensor, Normalize) every epoch. skindiff: `training_loader`, as
`train_classifier` uses it: every file decoded once, shrunk, kept in memory (timed, and counted
in the projected totals), then only the augmentation per epoch, in uint8 batches normalised on
the device, with `train_classifier`'s step: channels-last on a CPU and fused Adam. Both train the
reference head with `finetune head` (cross-entropy, Adam) with the same class-balanced sampler
and DataLoader options.

    python -m benchmarks.classifier_epoch                       # CPU, tiny, 1024 images
    python -m benchmarks.classifier_epoch --arch vgg16 --device cuda --images 8192
"""

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from benchmarks.common import Measurement, measure, ratio_line, record, table
from skindiff.classify.data import (
    class_indices,
    to_model_input,
    train_transform,
    weighted_sampler,
)
from skindiff.classify.models import build_classifier
from skindiff.classify.train import loader_options, placed_with_optimizer, training_loader
from skindiff.data.demo import draw_lesion_image
from skindiff.data.fitzpatrick import CONDITIONS

LABELS = tuple(sorted(CONDITIONS))
DRAWINGS = 16  # distinct drawings; each image is one of them shifted, flipped and noisy
PROTOCOL_EPOCHS = 30  # the reference's
LEARNING_RATE = 1e-3  # the reference's Adam


def write_images(folder: Path, count: int, width: int, seed: int = 0) -> pd.DataFrame:
    """`count` 4:3 skin-like JPEGs (quality 90) with camera-like noise, as manifest rows."""
    height = width * 3 // 4
    rng = np.random.default_rng(seed)
    drawings = [
        np.asarray(draw_lesion_image(LABELS[k % len(LABELS)], 5, rng, width))[:height]
        for k in range(DRAWINGS)
    ]
    rows = []
    for k in range(count):
        pixels = np.roll(drawings[k % DRAWINGS], rng.integers(width), axis=1)
        pixels = pixels[:, ::-1] if rng.random() < 0.5 else pixels
        noisy = np.clip(pixels + rng.normal(0, 4, pixels.shape), 0, 255).astype(np.uint8)
        path = folder / f"{k:05d}.jpg"
        Image.fromarray(noisy).save(path, quality=90)
        label = LABELS[k % DRAWINGS % len(LABELS)]
        rows.append({"md5hash": f"{k:05d}", "label": label, "path": str(path)})
    return pd.DataFrame(rows).assign(fitzpatrick_scale=5, group="dark")


class ReferenceDataset(Dataset):
    """The baseline: decode with PIL and transform, every time an image is drawn."""

    def __init__(self, rows: pd.DataFrame, image_size: int):
        self.paths = list(rows["path"])
        self.targets = class_indices(rows, LABELS, "images")
        self.transform = train_transform(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB")), self.targets[i]


def epoch_runner(
    loader: DataLoader, arch: str, device: torch.device, skindiff: bool
) -> Callable[[], None]:
    """One epoch of the classifier's training step on `loader`'s batches, per call: the plain
    one, or skindiff's (channels-last on a CPU, fused Adam, normalised on the device)."""
    torch.manual_seed(0)
    model = build_classifier(arch, len(LABELS), weights="none", finetune="head")
    if skindiff:
        optimizer = placed_with_optimizer(model, device, LEARNING_RATE)
    else:
        model.to(device)
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(trained, lr=LEARNING_RATE)

    def to_input(images: torch.Tensor) -> torch.Tensor:
        return to_model_input(images, device) if skindiff else images.to(device)

    def run() -> None:
        model.train()
        for images, targets in loader:
            loss = F.cross_entropy(model(to_input(images)), targets.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return run


def steady(name: str, epochs: list[Measurement]) -> Measurement:
    """The mean of epochs 2.. (epoch 1 alone when there is no other)."""
    later = epochs[1:] or epochs
    seconds = sum(m.seconds for m in later) / len(later)
    return Measurement(name, seconds, epochs[0].items, "img", max(m.peak_mb for m in later))


def projected(name: str, once: list[Measurement], epochs: list[Measurement]) -> Measurement:
    """`PROTOCOL_EPOCHS` epochs: `once`, epoch 1, then the steady epoch for the rest. The peak
    is that of `once` and epoch 1, which each way runs without the other's data in memory."""
    rest = steady(name, epochs).seconds * (PROTOCOL_EPOCHS - 1)
    seconds = sum(m.seconds for m in once) + epochs[0].seconds + rest
    peak = max(m.peak_mb for m in [*once, epochs[0]])
    return Measurement(name, seconds, PROTOCOL_EPOCHS, "epoch", peak)


def per_epoch(m: Measurement) -> Measurement:
    return Measurement(m.name, m.seconds, 1, "epoch", m.peak_mb)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--source-size", type=int, default=512, help="JPEG width (4:3)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--arch", default="tiny")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory(prefix="classifier-epoch-") as folder:
        rows = write_images(Path(folder), args.images, args.source_size)
        baseline_loader = DataLoader(
            ReferenceDataset(rows, args.image_size),
            batch_size=args.batch_size,
            sampler=weighted_sampler(rows, LABELS, seed=0),
            **loader_options(device),
        )
        baseline_epoch = epoch_runner(baseline_loader, args.arch, device, skindiff=False)
        baseline = [measure("baseline epoch 1", baseline_epoch, len(rows), "img", device)]

        loaders: list[DataLoader] = []

        def decode_once() -> None:
            loaders.append(
                training_loader(rows, LABELS, args.image_size, args.batch_size, 0, device)
            )

        decode = measure("skindiff decode once", decode_once, len(rows), "img", device)
        skindiff_epoch = epoch_runner(loaders[0], args.arch, device, skindiff=True)
        skindiff = [measure("skindiff epoch 1", skindiff_epoch, len(rows), "img", device)]
        # Then the ways alternate, so that both share whatever else the machine is doing.
        for epoch in range(2, args.epochs + 1):
            for name, run, times in (
                ("baseline", baseline_epoch, baseline),
                ("skindiff", skindiff_epoch, skindiff),
            ):
                times.append(measure(f"{name} epoch {epoch}", run, len(rows), "img", device))
        cached_mb = sum(pixels.nbytes for pixels, _ in loaders[0].dataset.images) / 2**20

    fast, slow = steady("skindiff epochs 2..", skindiff), steady("baseline epochs 2..", baseline)
    epochs = table(
        f"classifier epochs, {args.arch} on {device.type}, {len(rows)} JPEGs of "
        f"{args.source_size}x{args.source_size * 3 // 4} px, crops of {args.image_size}, "
        f"batch {args.batch_size}",
        [*baseline, slow, decode, *skindiff, fast],
    )
    memory = (
        f"peak MB: {'GPU memory' if device.type == 'cuda' else 'the process resident set'}; "
        f"from skindiff's decoding on, {cached_mb:.0f} MB of decoded images (uint8) stay in "
        "memory, during baseline epochs 2.. too"
    )
    total_fast = projected("skindiff", [decode], skindiff)
    total_slow = projected("baseline", [], baseline)
    protocol = table(
        f"the {PROTOCOL_EPOCHS}-epoch protocol, projected (skindiff's decoding included)",
        [total_slow, total_fast],
    )
    ratios = [
        ratio_line(f"{PROTOCOL_EPOCHS}-epoch protocol", total_fast, total_slow),
        ratio_line("classifier epoch", per_epoch(fast), per_epoch(slow)),
    ]
    record("classifier_epoch", "\n".join([epochs, memory, "", protocol, *ratios]), device)


if __name__ == "__main__":
    main()
