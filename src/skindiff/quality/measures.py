"""How good a set of synthetic images is, from image features (one row per image).

Fidelity and diversity against a reference set of real images: Fréchet distance and KID (the
arithmetic of torchmetrics' FID and KID, fed features instead of images), and precision,
recall, density and coverage (Naeem et al., 2020) from k-nearest-neighbour balls. Memorization:
each synthetic image's cosine similarity (about the training features' mean) to its nearest real
training image other than its own source, beside its similarity to that source (img2img is meant
to keep the source's lesion).

Features are compared in float64 for the Fréchet distance (a covariance of 1,500 images in 512
dimensions is near singular); the neighbour searches run in chunks, so 40,000 synthetic images
never build a 40,000 x 40,000 matrix.
"""

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from skindiff.errors import require

CHUNK = 2048  # rows of a distance matrix computed at once: 2048 x 40k float32 = 330 MB
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000  # torchmetrics' default, capped at the smaller set


class _Features(nn.Module):
    """torchmetrics' feature extractor for features already extracted: the identity."""

    def __init__(self, dimensions: int):
        super().__init__()
        self.num_features = dimensions  # spares torchmetrics its dummy image through us

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _check(reference: np.ndarray, synthetic: np.ndarray, at_least: int) -> None:
    require(
        reference.ndim == synthetic.ndim == 2 and reference.shape[1] == synthetic.shape[1],
        "reference and synthetic features must be (images, dimensions) arrays of one width",
    )
    require(
        min(len(reference), len(synthetic)) >= at_least,
        f"the measure needs at least {at_least} images on each side, got "
        f"{len(reference)} reference and {len(synthetic)} synthetic",
    )


def frechet_distance(reference: np.ndarray, synthetic: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to the two feature sets (FID's formula)."""
    _check(reference, synthetic, 2)
    metric = FrechetInceptionDistance(feature=_Features(reference.shape[1]))
    metric.update(torch.from_numpy(np.asarray(reference, np.float64)), real=True)
    metric.update(torch.from_numpy(np.asarray(synthetic, np.float64)), real=False)
    return float(metric.compute())


def kernel_distance(
    reference: np.ndarray, synthetic: np.ndarray, seed: int = 0
) -> tuple[float, float]:
    """KID: the unbiased MMD with a cubic polynomial kernel, (mean, std) over KID_SUBSETS
    subsets of min(KID_SUBSET_SIZE, either set's size) images; the subsets drawn from `seed`."""
    _check(reference, synthetic, 2)
    size = min(KID_SUBSET_SIZE, len(reference), len(synthetic))
    with warnings.catch_warnings():  # that it keeps the features: so do we, as arrays
        warnings.filterwarnings("ignore", "Metric `Kernel Inception Distance` will save")
        metric = KernelInceptionDistance(
            feature=_Features(reference.shape[1]), subsets=KID_SUBSETS, subset_size=size
        )
    metric.update(torch.from_numpy(np.asarray(reference, np.float64)), real=True)
    metric.update(torch.from_numpy(np.asarray(synthetic, np.float64)), real=False)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # torchmetrics draws the subsets from torch's global generator
    try:
        mean, std = metric.compute()
    finally:
        torch.random.set_rng_state(state)
    return float(mean), float(std)


@dataclass(frozen=True)
class Coverage:
    """Precision, recall, density and coverage (Naeem et al., 2020) at k neighbours."""

    precision: float  # share of synthetic images inside some reference image's k-NN ball
    recall: float  # share of reference images inside some synthetic image's k-NN ball
    density: float  # reference balls holding a synthetic image, per synthetic image, over k
    coverage: float  # share of reference balls holding at least one synthetic image


def _kth_neighbour_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's distance to its k-th nearest other row."""
    radii = [
        torch.cdist(chunk, features).topk(k + 1, largest=False).values[:, k]
        for chunk in features.split(CHUNK)
    ]
    return torch.cat(radii)


def precision_recall_density_coverage(
    reference: np.ndarray, synthetic: np.ndarray, k: int = 5
) -> Coverage:
    """The four k-NN measures on Euclidean distances between features."""
    _check(reference, synthetic, k + 1)
    real = torch.from_numpy(np.asarray(reference, np.float32))
    fake = torch.from_numpy(np.asarray(synthetic, np.float32))
    real_radii, fake_radii = _kth_neighbour_radii(real, k), _kth_neighbour_radii(fake, k)
    in_real_balls = torch.zeros(len(fake))  # per synthetic image: the reference balls holding it
    real_covered = torch.zeros(len(real), dtype=torch.bool)
    real_recalled = torch.zeros(len(real), dtype=torch.bool)
    start = 0
    for chunk in fake.split(CHUNK):
        distances = torch.cdist(real, chunk)  # reference x this chunk of synthetic images
        inside = distances <= real_radii[:, None]
        in_real_balls[start : start + len(chunk)] = inside.sum(0).float()
        real_covered |= inside.any(1)
        real_recalled |= (distances <= fake_radii[None, start : start + len(chunk)]).any(1)
        start += len(chunk)
    return Coverage(
        precision=float((in_real_balls > 0).float().mean()),
        recall=float(real_recalled.float().mean()),
        density=float(in_real_balls.mean() / k),
        coverage=float(real_covered.float().mean()),
    )


@dataclass(frozen=True)
class Nearest:
    """Per synthetic image: its cosine similarity to the nearest training image that is not its
    source (and that image's index), and to its own source (NaN without one)."""

    similarity: np.ndarray
    index: np.ndarray
    source_similarity: np.ndarray


def nearest_training_images(
    synthetic: np.ndarray, training: np.ndarray, sources: np.ndarray
) -> Nearest:
    """Cosine similarities of synthetic to training features, both centred on the training
    features' mean; `sources[j]` is the row of synthetic image j's source in `training`, or -1
    (txt2img: no source)."""
    require(
        synthetic.ndim == training.ndim == 2 and synthetic.shape[1] == training.shape[1],
        "synthetic and training features must be (images, dimensions) arrays of one width",
    )
    require(len(training) >= 2, "memorization needs at least 2 training images")
    require(len(sources) == len(synthetic), "one source row per synthetic image (-1: none)")
    # centred on the training images' mean: ReLU features all point into one orthant, where
    # even unrelated images have cosine near 1; about their mean, only alike images do
    center = np.asarray(training, np.float64).mean(0)
    train = torch.from_numpy(np.asarray(training - center, np.float32))
    fake = torch.from_numpy(np.asarray(synthetic - center, np.float32))
    train, fake = nn.functional.normalize(train, dim=1), nn.functional.normalize(fake, dim=1)
    source_rows = torch.from_numpy(np.asarray(sources, np.int64))
    similarity, index, own = [], [], []
    for chunk, rows in zip(fake.split(CHUNK), source_rows.split(CHUNK), strict=True):
        similarities = chunk @ train.T
        has_source = rows >= 0
        at = torch.arange(len(chunk))
        own.append(
            torch.where(has_source, similarities[at, rows.clamp(min=0)], torch.tensor(np.nan))
        )
        similarities[at[has_source], rows[has_source]] = -torch.inf  # never its own source
        best = similarities.max(1)
        similarity.append(best.values)
        index.append(best.indices)
    return Nearest(
        similarity=torch.cat(similarity).numpy().astype(np.float64),
        index=torch.cat(index).numpy(),
        source_similarity=torch.cat(own).numpy().astype(np.float64),
    )
