"""Scores of a prediction set: overall, per class, per skin type and per skin-type group.

Overall averages run over all classes (a class absent from the set scores 0). Averages within a
skin type or group run over the classes present in that subset's true labels, so a subset is not
penalised for classes it has no images of; the light-dark gaps compare those.
"""

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from skindiff.core.labels import slug
from skindiff.core.manifest import require_columns
from skindiff.data.cohort import DARK, LIGHT
from skindiff.data.fitzpatrick import DARK_FST, LIGHT_FST
from skindiff.errors import SkindiffError

REQUIRED_COLUMNS = ("label", "predicted", "fitzpatrick_scale")


def classification_metrics(
    predictions: pd.DataFrame, labels: Sequence[str], prefix: str
) -> dict[str, float]:
    """`{prefix}_accuracy`, macro and weighted precision/recall/F1, per-class scores, accuracy
    and macro F1 per skin type (`_fst5`) and group (`_light`, `_dark`), and the light-minus-dark
    gaps `{prefix}_accuracy_gap` and `{prefix}_f1_macro_gap` when both groups are present."""
    _check(predictions)
    labels = list(labels)
    truth, predicted = predictions["label"], predictions["predicted"]
    metrics = {f"{prefix}_accuracy": float(accuracy_score(truth, predicted))}
    for average in ("macro", "weighted"):
        scores = precision_recall_fscore_support(
            truth, predicted, labels=labels, average=average, zero_division=0
        )
        for name, value in zip(("precision", "recall", "f1"), scores[:3], strict=True):
            metrics[f"{prefix}_{name}_{average}"] = float(value)
    per_class = precision_recall_fscore_support(
        truth, predicted, labels=labels, average=None, zero_division=0
    )
    for name, values in zip(("precision", "recall", "f1"), per_class[:3], strict=True):
        for label, value in zip(labels, values, strict=True):
            metrics[f"{prefix}_{name}_{slug(label)}"] = float(value)

    for fst, subset in predictions.groupby("fitzpatrick_scale", sort=True):
        metrics |= _subset_scores(subset, prefix, f"fst{int(fst)}")
    groups = _groups(predictions)
    for group in (LIGHT, DARK):
        if (groups == group).any():
            metrics |= _subset_scores(predictions[groups == group], prefix, group)
    if (groups == LIGHT).any() and (groups == DARK).any():
        for name in ("accuracy", "f1_macro"):
            metrics[f"{prefix}_{name}_gap"] = (
                metrics[f"{prefix}_{name}_{LIGHT}"] - metrics[f"{prefix}_{name}_{DARK}"]
            )
    return metrics


def confusion_matrix_figure(predictions: pd.DataFrame, labels: Sequence[str]) -> Figure:
    """Counts of (true, predicted) label pairs as an annotated heat map."""
    _check(predictions)
    labels = list(labels)
    counts = confusion_matrix(predictions["label"], predictions["predicted"], labels=labels)
    side = 2.0 + 0.7 * len(labels)
    figure = Figure(figsize=(side + 1.5, side), layout="constrained")
    FigureCanvasAgg(figure)  # render with Agg whatever pyplot's backend is
    axes = figure.add_subplot()
    image = axes.imshow(counts, cmap="Blues", vmin=0)
    figure.colorbar(image, ax=axes, label="images")
    ticks = np.arange(len(labels))
    axes.set_xticks(ticks, labels, rotation=45, ha="right")
    axes.set_yticks(ticks, labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    dark_cells = counts > counts.max() / 2
    for (row, column), count in np.ndenumerate(counts):
        color = "white" if dark_cells[row, column] else "black"
        axes.text(column, row, str(count), ha="center", va="center", color=color)
    return figure


def _subset_scores(subset: pd.DataFrame, prefix: str, suffix: str) -> dict[str, float]:
    """Accuracy and macro F1 of a subset, averaged over the classes it has images of."""
    present = sorted(set(subset["label"]))
    _, _, f1, _ = precision_recall_fscore_support(
        subset["label"], subset["predicted"], labels=present, average="macro", zero_division=0
    )
    return {
        f"{prefix}_accuracy_{suffix}": float(accuracy_score(subset["label"], subset["predicted"])),
        f"{prefix}_f1_macro_{suffix}": float(f1),
    }


def _groups(predictions: pd.DataFrame) -> pd.Series:
    """The `group` column, or the group implied by the skin type (none for FST 3-4)."""
    if "group" in predictions.columns:
        return predictions["group"]
    by_fst = {fst: LIGHT for fst in LIGHT_FST} | {fst: DARK for fst in DARK_FST}
    return predictions["fitzpatrick_scale"].map(by_fst)


def _check(predictions: pd.DataFrame) -> None:
    require_columns(predictions, REQUIRED_COLUMNS, "predictions")
    if predictions.empty:
        raise SkindiffError("predictions are empty: there is nothing to score")
