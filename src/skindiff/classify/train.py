"""Training a skin-condition classifier, and which epoch's weights it keeps (`selection`).

The loop is the reference code's (Adam, StepLR at a third of the epochs, class-balanced
sampling, 30 epochs of batch 256). The reference chose the epoch on the test set, which
overstates the test scores; `selection` says which epoch is kept:
- val (default): the best validation macro-F1, the earlier epoch on ties;
- last: the last epoch; no validation split is needed (val_fraction 0 trains on the paper's
  full training sets), and without one nothing is scored on validation;
- test: the reference code's rule, for comparison with the paper only (`reference_test_epoch`):
  the lowest test loss among epochs 12 and later whose loss is below epoch 11's, else the
  initial weights (best_epoch 0).
With val and last the test split is predicted exactly once, with the kept weights; with test
it is also predicted after every epoch. The validation split, when there is one, is scored
after every epoch whatever the selection.
"""

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from skindiff.classify.config import (
    MIN_IMAGE_SIZE,
    ClassifierConfig,
    Selection,
    require_validation,
)
from skindiff.classify.data import (
    ManifestDataset,
    memory_format_on,
    to_model_input,
    weighted_sampler,
)
from skindiff.classify.metrics import classification_metrics
from skindiff.classify.models import build_classifier
from skindiff.core.device import fused_adam, pick_device
from skindiff.core.labels import slug
from skindiff.core.manifest import PREDICTION_COLUMNS
from skindiff.errors import SkindiffError


@dataclass(frozen=True)
class ClassifierResult:
    """A trained classifier with its training curve and its validation and test predictions."""

    model: nn.Module  # weights of the kept epoch, eval mode, on CPU
    labels: tuple[str, ...]  # class index -> label
    # epoch, train_loss, then <split>_loss, <split>_accuracy, <split>_f1_macro of each split
    # scored every epoch (val when there is one, test with selection test), then lr (used).
    history: pd.DataFrame
    best_epoch: int  # the kept epoch; 0: the initial weights (selection test only)
    # Of the kept weights: PREDICTION_COLUMNS, then prob_<label slug> per class; None without a
    # validation split.
    val_predictions: pd.DataFrame | None
    test_predictions: pd.DataFrame


def train_classifier(
    config: ClassifierConfig,
    train: pd.DataFrame,
    val: pd.DataFrame,
    test: pd.DataFrame,
    labels: Sequence[str],
    progress: bool = True,
    on_epoch: Callable[[int, float], None] | None = None,
) -> ClassifierResult:
    """Trains on `train` (from build_training_set), keeps the epoch `config.selection` picks,
    predicts `test` with it. `val` may be empty unless the selection is val.

    `on_epoch(epoch, val_f1_macro)` is called after every epoch when there is a validation
    split (a tuner reports it and may raise to stop a hopeless run). Deterministic given
    `config.seed` on a CPU.
    """
    labels = _check_labels(labels)
    require_validation(config.selection, not val.empty, "val is empty")
    for name, rows in (("train", train), ("test", test)):
        if rows.empty:
            raise SkindiffError(f"{name} is empty")

    torch.manual_seed(config.seed)
    device = pick_device()
    model = build_classifier(config.arch, len(labels), config.resolved_weights, config.finetune)
    optimizer = placed_with_optimizer(model, device, config.learning_rate)
    scored = {"val": val} if not val.empty else {}
    if config.selection == Selection.TEST:
        scored["test"] = test
    # Every split's files are found before any is decoded, which can take minutes.
    loaders = {
        name: _eval_loader(rows, labels, config.image_size, config.batch_size, name, device)
        for name, rows in ({"test": test} | scored).items()
    }
    train_loader = training_loader(
        train, labels, config.image_size, config.batch_size, config.seed, device, progress
    )
    # The splits scored every epoch are decoded once; a test split predicted once is read once.
    for name in scored:
        loaders[name].dataset.decode_all(progress)
    scheduler = torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=max(1, config.epochs // 3), gamma=0.1
    )

    # The initial weights are an outcome of selection test only; they are dropped once an
    # epoch is kept, which can then never go back to them.
    best_state = _cpu_copy(model) if config.selection == Selection.TEST else None
    history = []
    best_epoch, val_predictions = 0, None
    for epoch in range(1, config.epochs + 1):
        lr = scheduler.get_last_lr()[0]
        bar = tqdm(
            total=len(train_loader),
            desc=f"epoch {epoch}/{config.epochs}",
            unit="batch",
            disable=not progress,
        )
        train_loss = _train_epoch(model, train_loader, optimizer, device, bar)
        scheduler.step()
        row = {"epoch": epoch, "train_loss": train_loss}
        predictions = {}
        for name, rows in scored.items():
            logits = _logits(model, loaders[name], device)
            predictions[name] = _prediction_frame(rows, labels, logits)
            scores = classification_metrics(predictions[name], labels, name)
            targets = torch.tensor(loaders[name].dataset.targets)
            row[f"{name}_loss"] = F.cross_entropy(logits, targets).item()
            for metric in ("accuracy", "f1_macro"):
                row[f"{name}_{metric}"] = scores[f"{name}_{metric}"]
        history.append(row | {"lr": lr})
        f1s = {f"{name}_f1": f"{row[f'{name}_f1_macro']:.3f}" for name in scored}
        bar.set_postfix(train_loss=f"{train_loss:.3f}", **f1s)
        bar.close()
        if on_epoch is not None and "val" in scored:
            on_epoch(epoch, row["val_f1_macro"])
        if _kept_epoch(config.selection, history) == epoch:
            best_epoch, best_state = epoch, _cpu_copy(model)
            val_predictions = predictions.get("val")

    model.load_state_dict(best_state)
    if best_epoch == 0 and "val" in scored:
        val_predictions = _prediction_frame(val, labels, _logits(model, loaders["val"], device))
    test_predictions = _prediction_frame(test, labels, _logits(model, loaders["test"], device))
    return ClassifierResult(
        model=model.cpu().eval(),
        labels=labels,
        history=pd.DataFrame(history),
        best_epoch=best_epoch,
        val_predictions=val_predictions,
        test_predictions=test_predictions,
    )


# The reference's epoch 10 (0-based), whose test loss later epochs must beat to be kept.
REFERENCE_BASELINE_EPOCH = 11


def reference_test_epoch(test_losses: Sequence[float]) -> int:
    """The epoch the reference code keeps, 1-based, given the test loss after each epoch: the
    lowest loss (the earlier on ties) among epochs after REFERENCE_BASELINE_EPOCH strictly
    below that epoch's loss; 0, the initial weights, when there is none (also when training
    stops before such an epoch)."""
    kept, best = 0, math.inf
    for epoch, loss in enumerate(test_losses, start=1):
        if epoch == REFERENCE_BASELINE_EPOCH:
            best = loss
        elif epoch > REFERENCE_BASELINE_EPOCH and loss < best:
            kept, best = epoch, loss
    return kept


def _kept_epoch(selection: Selection, history: Sequence[dict[str, float]]) -> int:
    """The epoch `selection` keeps after the epochs of `history` (0: the initial weights)."""
    if selection == Selection.LAST:
        return len(history)
    if selection == Selection.TEST:
        return reference_test_epoch([row["test_loss"] for row in history])
    f1s = [row["val_f1_macro"] for row in history]
    return 1 + f1s.index(max(f1s))  # the earlier on ties


def _cpu_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def predict(
    model: nn.Module, rows: pd.DataFrame, labels: Sequence[str], image_size: int, batch_size: int
) -> pd.DataFrame:
    """Predictions of `model` (on the device it is on) for manifest rows, with the test-time
    transforms: PREDICTION_COLUMNS, then prob_<label slug> per class."""
    labels = _check_labels(labels)
    if image_size < MIN_IMAGE_SIZE:
        raise SkindiffError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
    if batch_size < 1:
        raise SkindiffError(f"batch_size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    loader = _eval_loader(rows, labels, image_size, batch_size, "rows", device)
    return _prediction_frame(rows, labels, _logits(model, loader, device))


def training_loader(
    rows: pd.DataFrame,
    labels: Sequence[str],
    image_size: int,
    batch_size: int,
    seed: int,
    device: torch.device,
    progress: bool = False,
) -> DataLoader:
    """Class-balanced batches of `rows` (from build_training_set) for `device`, augmented anew
    every epoch; every file is decoded once, here (ManifestDataset.decode_all)."""
    dataset = ManifestDataset(rows, labels, image_size, "train", augment=True)
    dataset.decode_all(progress)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=weighted_sampler(rows, labels, seed),
        **loader_options(device),
    )


def placed_with_optimizer(
    model: nn.Module, device: torch.device, learning_rate: float
) -> torch.optim.Adam:
    """Moves `model` to `device` in the layout its inputs come in (`memory_format_on`) and
    returns the reference's Adam over its trainable parameters, as torch's fused kernel."""
    model.to(device, memory_format=memory_format_on(device))
    trained = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(trained, lr=learning_rate, fused=fused_adam(trained))


def loader_options(device: torch.device) -> dict[str, Any]:
    """DataLoader options for batches that go to `device`.

    On a GPU, worker processes prepare batches while it computes, into pinned memory for
    faster copies; they are forked, so they share the decoded images instead of each getting a
    copy, and persist across epochs. On a CPU, workers would take the cores the training step
    uses, so batches are prepared in the training process.
    """
    if device.type != "cuda":
        return {}
    return {
        "num_workers": min(8, os.cpu_count() or 1),
        "pin_memory": True,
        "persistent_workers": True,
        "multiprocessing_context": "fork",
    }


def _train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    bar: tqdm,
) -> float:
    """One pass over the sampler's draws; the mean loss per image."""
    model.train()
    total, seen = 0.0, 0
    for images, targets in loader:
        loss = F.cross_entropy(model(to_model_input(images, device)), targets.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.item()
        total += value * len(targets)
        seen += len(targets)
        bar.update()
        bar.set_postfix(loss=f"{value:.3f}")
    return total / seen


def _eval_loader(
    rows: pd.DataFrame,
    labels: Sequence[str],
    image_size: int,
    batch_size: int,
    name: str,
    device: torch.device,
) -> DataLoader:
    dataset = ManifestDataset(rows, labels, image_size, name)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, **loader_options(device))


@torch.inference_mode()
def _logits(model: nn.Module, loader: DataLoader, device: torch.device) -> torch.Tensor:
    """Logits of every image of `loader`, in order, on the CPU."""
    model.eval()
    return torch.cat([model(to_model_input(images, device)).float().cpu() for images, _ in loader])


def _prediction_frame(
    rows: pd.DataFrame, labels: tuple[str, ...], logits: torch.Tensor
) -> pd.DataFrame:
    frame = rows.reset_index(drop=True).assign(
        predicted=[labels[i] for i in logits.argmax(dim=1).tolist()]
    )[list(PREDICTION_COLUMNS)]
    probabilities = logits.softmax(dim=1).numpy()
    for i, label in enumerate(labels):
        frame[f"prob_{slug(label)}"] = probabilities[:, i]
    return frame


def _check_labels(labels: Sequence[str]) -> tuple[str, ...]:
    labels = tuple(labels)
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise SkindiffError(f"labels must be at least two distinct classes, got {list(labels)}")
    return labels
