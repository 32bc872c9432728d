"""Image features for the quality measures.

Mostly the input of a network's last linear layer (`Penultimate`): for an ImageNet backbone
(ResNet-18, VGG-16, ViT-B/16, with the weights `weights auto` already reads) its pooled features
(512, 4096, 768 values); for a skindiff classifier, the 256 values its reference head computes
before the class scores, which is what the embedded default has in place of pretrained weights.
Or the FID Inception's 2048 pooled features, from its weights file (`FidInception`). Images get
the classifier's test-time transforms (resize, centre crop).

Features are cached by content: one file per (network, image file digest), so an image scored
again, by another seed's stage or another call, is never run through the network twice.
"""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import models

from skindiff.classify.config import Arch, Weights
from skindiff.classify.data import IMAGENET_MEAN, IMAGENET_STD, ManifestDataset, to_model_input
from skindiff.classify.models import imagenet_file, require_imagenet_files
from skindiff.core.files import cache_dir, cached_arrays, sha256_file
from skindiff.errors import SkindiffError

FEATURES_DIR = "features"
# torch-fidelity's release of the FID Inception weights (what torchmetrics' FID downloads)
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = (
    f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS}"
)
INCEPTION_SIZE = 299


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


class Penultimate(nn.Module):
    """A network's features: the input of its last linear layer."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.last = model, last_linear(model)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        hook = self.last.register_forward_hook(
            lambda module, inputs, output: captured.append(inputs[0])
        )
        try:
            self.model(images)
        finally:
            hook.remove()
        return captured[-1]


class FidInception(nn.Module):
    """The Fréchet distance's usual network: torch-fidelity's port of TensorFlow's Inception v3
    (2048 pooled features), from its weights file. It takes 8-bit images, which the
    classifiers' normalised input is turned back into."""

    def __init__(self, weights: Path):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.network = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights)
        )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(-1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = ((images * self.std + self.mean) * 255).round().clamp(0, 255)
        return self.network(pixels.to(torch.uint8))[0]


def inception_file() -> Path:
    """Where the FID Inception weights are looked for: the torch hub checkpoints folder."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS


def require_inception_file() -> Path:
    """The FID Inception weights file; missing, one error saying where to fetch it."""
    path = inception_file()
    if not path.is_file():
        raise SkindiffError(
            f"quality_features inception: the FID Inception weights file {path} is missing "
            f"(nothing is downloaded): fetch {INCEPTION_URL} into {path.parent}"
        )
    return path


def fid_inception() -> FidInception:
    return FidInception(require_inception_file()).eval()


@torch.inference_mode()
def image_features(
    network: nn.Module, rows: pd.DataFrame, image_size: int, batch_size: int = 64
) -> np.ndarray:
    """(images, features) in row order: `network` (Penultimate, FidInception) on each image
    of manifest `rows` (columns path and label), on the device the network is on."""
    device = next(network.parameters()).device
    labels = sorted(set(rows["label"]))  # the dataset wants class targets; they go unused
    loader = DataLoader(ManifestDataset(rows, labels, image_size, "features"), batch_size)
    network.eval()
    batches = [network(to_model_input(images, device)).float().cpu() for images, _ in loader]
    return torch.cat(batches).numpy().astype(np.float32)


def cached_features(
    name: str,
    network: nn.Module | Callable[[], nn.Module],
    rows: pd.DataFrame,
    image_size: int,
    batch_size: int = 64,
) -> np.ndarray:
    """image_features of `rows`, read from the cache where an image file with the same
    content was scored by the network called `name` (unique to its weights and input size),
    the others computed once and cached; `network` may be a function loading it, called only
    when an image is missing."""
    if "sha256" in rows:
        digests = [str(digest) for digest in rows["sha256"]]
    else:
        digests = [sha256_file(path) for path in rows["path"]]

    def compute(missing: list[int]) -> np.ndarray:
        loaded = network if isinstance(network, nn.Module) else network()
        return image_features(loaded, rows.iloc[missing], image_size, batch_size)

    return cached_arrays(cache_dir() / FEATURES_DIR / name, digests, compute)
