"""The quality table of one synthetic set: its measures against the reference set, overall and
per condition, beside the same measures of the real light-skinned sources it was made from (the
baseline the synthetic images should beat), and its memorization."""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image

from skindiff.quality.measures import (
    frechet_distance,
    kernel_distance,
    nearest_training_images,
    precision_recall_density_coverage,
)

ALL = "all"  # the condition column of the rows over every condition
MIN_PER_CONDITION = 10  # images each side needs for a condition's own row
SETS = ("synthetic", "light_sources")
TABLE_COLUMNS = [
    "set",
    "condition",
    "n_images",
    "n_reference",
    "fd",
    "kid",
    "kid_std",
    "precision",
    "recall",
    "density",
    "coverage",
]


@dataclass(frozen=True)
class FeatureSet:
    """Features (one row per image) and each image's condition."""

    features: np.ndarray
    labels: np.ndarray


def quality_table(
    reference: FeatureSet, sets: dict[str, FeatureSet], k: int, seed: int = 0
) -> pd.DataFrame:
    """Rows of TABLE_COLUMNS: each set against the reference, over all conditions and per
    condition where both sides have MIN_PER_CONDITION images (KID's subsets drawn from
    `seed`)."""
    rows = []
    for name, images in sets.items():
        for condition in [ALL, *sorted(set(images.labels))]:
            ours, theirs = images.features, reference.features
            if condition != ALL:
                ours = ours[images.labels == condition]
                theirs = theirs[reference.labels == condition]
            if min(len(ours), len(theirs)) < max(MIN_PER_CONDITION, k + 1):
                continue
            kid, kid_std = kernel_distance(theirs, ours, seed)
            cover = precision_recall_density_coverage(theirs, ours, k)
            fd = frechet_distance(theirs, ours)
            measures = [fd, kid, kid_std, cover.precision, cover.recall, cover.density]
            rows.append([name, condition, len(ours), len(theirs), *measures, cover.coverage])
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


@dataclass(frozen=True)
class Memorization:
    """Per synthetic image (rows of `per_image`: nearest_similarity, nearest_index,
    source_similarity) and the share at or above the threshold."""

    per_image: pd.DataFrame
    share: float
    threshold: float


def memorization(
    synthetic: np.ndarray, training: np.ndarray, sources: np.ndarray, threshold: float
) -> Memorization:
    """Each synthetic image's nearest training image other than its source (`sources`: its
    row in `training`, -1 for none); memorized where their similarity reaches `threshold`."""
    nearest = nearest_training_images(synthetic, training, sources)
    per_image = pd.DataFrame(
        {
            "nearest_similarity": nearest.similarity,
            "nearest_index": nearest.index,
            "source_similarity": nearest.source_similarity,
        }
    )
    share = float((nearest.similarity >= threshold).mean())
    return Memorization(per_image, share, threshold)


def nearest_pairs_figure(
    synthetic_paths: Sequence[str],
    training_paths: Sequence[str],
    found: Memorization,
    shown: int = 8,
) -> Figure:
    """The synthetic images most similar to a training image that is not their source, each
    above that training image, with their similarity."""
    order = found.per_image["nearest_similarity"].sort_values(ascending=False).index[:shown]
    figure = Figure(figsize=(1.6 * max(len(order), 1), 3.6), layout="constrained")
    axes = figure.subplots(2, max(len(order), 1), squeeze=False)
    for column, row in enumerate(order):
        pair = found.per_image.loc[row]
        for line, path in enumerate(
            (synthetic_paths[row], training_paths[int(pair["nearest_index"])])
        ):
            with Image.open(path) as image:
                axes[line, column].imshow(image.convert("RGB"))
        axes[0, column].set_title(f"{pair['nearest_similarity']:.3f}", fontsize=9)
    for axis in axes.ravel():
        axis.set_axis_off()
    figure.suptitle(
        "synthetic (top) and its most similar training image other than its source (bottom); "
        f"memorized at >= {found.threshold}",
        fontsize=9,
    )
    return figure
