"""Image features for the quality measures: the input of a network's last linear layer.

For an ImageNet backbone (ResNet-18, VGG-16, ViT-B/16, with the weights `weights auto` already
reads) that is its pooled features (512, 4096, 768 values); for a skindiff classifier, the
256 values its reference head computes before the class scores, which is what the embedded
default has in place of pretrained weights. Images get the classifier's test-time transforms.

Features are cached by content: one file per (network, image file digest), so an image scored
again, by another seed's stage or another call, is never run through the network twice.
"""

import hashlib
import io
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import models

from skindiff.classify.config import Arch, Weights
from skindiff.classify.data import ManifestDataset, to_model_input
from skindiff.classify.models import imagenet_file, require_imagenet_files
from skindiff.core.files import cache_dir, write_atomic
from skindiff.errors import SkindiffError

FEATURES_DIR = "features"


def imagenet_backbone(arch: Arch) -> nn.Module:
    """torchvision's `arch` as trained on ImageNet, its own last layer kept, from the weights
    file the classifiers read (a missing file: one error saying how to fetch it)."""
    require_imagenet_files([arch], Weights.IMAGENET)
    model = getattr(models, str(arch))()
    model.load_state_dict(torch.load(imagenet_file(arch), map_location="cpu", weights_only=True))
    return model.eval()


def last_linear(model: nn.Module) -> nn.Linear:
    """The network's last linear layer: its input is the features."""
    linear = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linear:
        raise SkindiffError(f"{type(model).__name__} has no linear layer to take features before")
    return linear[-1]


@torch.inference_mode()
def penultimate_features(
    model: nn.Module, rows: pd.DataFrame, image_size: int, batch_size: int = 64
) -> np.ndarray:
    """(images, features) in row order: the input of `last_linear(model)` for each image of
    manifest `rows` (columns path and label), on the device the model is on."""
    device = next(model.parameters()).device
    labels = sorted(set(rows["label"]))  # the dataset wants class targets; they go unused
    loader = DataLoader(ManifestDataset(rows, labels, image_size, "features"), batch_size)
    captured: list[torch.Tensor] = []
    hook = last_linear(model).register_forward_hook(
        lambda module, inputs, output: captured.append(inputs[0].float().cpu())
    )
    model.eval()
    try:
        for images, _ in loader:
            model(to_model_input(images, device))
    finally:
        hook.remove()
    return torch.cat(captured).numpy().astype(np.float32)


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cached_features(
    network: str,
    model: nn.Module,
    rows: pd.DataFrame,
    image_size: int,
    batch_size: int = 64,
) -> np.ndarray:
    """penultimate_features of `rows`, read from the cache where an image file with the same
    content was scored by `network` (a name unique to the model's weights and input size),
    the others computed once and cached."""
    folder = cache_dir() / FEATURES_DIR / network
    if "sha256" in rows:
        digests = [str(digest) for digest in rows["sha256"]]
    else:
        digests = [file_digest(path) for path in rows["path"]]
    files = [folder / f"{digest}.npy" for digest in digests]
    missing = [i for i, file in enumerate(files) if not file.is_file()]
    if missing:
        computed = penultimate_features(model, rows.iloc[missing], image_size, batch_size)
        folder.mkdir(parents=True, exist_ok=True)
        for i, values in zip(missing, computed, strict=True):
            write_atomic(files[i], _npy(values))
    return np.stack([np.load(file) for file in files])


def _npy(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return buffer.getvalue()
