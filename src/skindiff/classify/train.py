"""Training a skin-condition classifier, with the best epoch chosen on the validation split.

The loop is the reference code's (Adam, StepLR at a third of the epochs, class-balanced
sampling, 30 epochs of batch 256), except for its known flaw: the reference kept the epoch that
scored best on the test set. Here the epoch with the best validation macro-F1 is kept (the
earlier one on ties), and the test split is predicted exactly once, with those weights.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from skindiff.classify.config import MIN_IMAGE_SIZE, ClassifierConfig
from skindiff.classify.data import (
    ManifestDataset,
    eval_transform,
    train_transform,
    weighted_sampler,
)
from skindiff.classify.metrics import classification_metrics
from skindiff.classify.models import build_classifier
from skindiff.core.device import pick_device
from skindiff.core.manifest import PREDICTION_COLUMNS, slug
from skindiff.errors import SkindiffError


@dataclass(frozen=True)
class ClassifierResult:
    """A trained classifier with its training curve and its validation and test predictions."""

    model: nn.Module  # weights of the best epoch, eval mode, on CPU
    labels: tuple[str, ...]  # class index -> label
    history: pd.DataFrame  # epoch, train_loss, val_loss, val_accuracy, val_f1_macro, lr (used)
    best_epoch: int
    val_predictions: pd.DataFrame  # PREDICTION_COLUMNS, then prob_<label slug> per class
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
    """Trains on `train` (from build_training_set), picks the epoch on `val`, predicts `test`.

    `on_epoch(epoch, val_f1_macro)` is called after every epoch (a tuner reports it and may
    raise to stop a hopeless run). Deterministic given `config.seed` on a CPU.
    """
    labels = _check_labels(labels)
    if val.empty:
        raise SkindiffError(
            "val is empty: the best epoch is chosen on the validation split; "
            "prepare the data with val_fraction > 0"
        )
    for name, rows in (("train", train), ("test", test)):
        if rows.empty:
            raise SkindiffError(f"{name} is empty")

    torch.manual_seed(config.seed)
    device = pick_device()
    model = build_classifier(config.arch, len(labels), config.weights, config.finetune)
    model.to(device)
    train_loader = DataLoader(
        ManifestDataset(train, labels, train_transform(config.image_size), "train"),
        batch_size=config.batch_size,
        sampler=weighted_sampler(train, labels, config.seed),
    )
    # Built before training so that a missing val or test image stops the run at once.
    val_loader = _eval_loader(val, labels, config.image_size, config.batch_size, "val")
    test_loader = _eval_loader(test, labels, config.image_size, config.batch_size, "test")
    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=config.learning_rate
    )
    scheduler = torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=max(1, config.epochs // 3), gamma=0.1
    )
    val_targets = torch.tensor(val_loader.dataset.targets)

    history = []
    best_f1 = -1.0
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
        logits = _logits(model, val_loader, device)
        predictions = _prediction_frame(val, labels, logits)
        scores = classification_metrics(predictions, labels, "val")
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": F.cross_entropy(logits, val_targets).item(),
                "val_accuracy": scores["val_accuracy"],
                "val_f1_macro": scores["val_f1_macro"],
                "lr": lr,
            }
        )
        bar.set_postfix(train_loss=f"{train_loss:.3f}", val_f1=f"{scores['val_f1_macro']:.3f}")
        bar.close()
        if on_epoch is not None:
            on_epoch(epoch, scores["val_f1_macro"])
        if scores["val_f1_macro"] > best_f1:
            best_f1, best_epoch, val_predictions = scores["val_f1_macro"], epoch, predictions
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    model.load_state_dict(best_state)
    test_predictions = _prediction_frame(test, labels, _logits(model, test_loader, device))
    return ClassifierResult(
        model=model.cpu().eval(),
        labels=labels,
        history=pd.DataFrame(history),
        best_epoch=best_epoch,
        val_predictions=val_predictions,
        test_predictions=test_predictions,
    )


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
    loader = _eval_loader(rows, labels, image_size, batch_size, "rows")
    return _prediction_frame(rows, labels, _logits(model, loader, device))


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
        images, targets = images.to(device), targets.to(device)
        loss = F.cross_entropy(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(targets)
        seen += len(targets)
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return total / seen


def _eval_loader(
    rows: pd.DataFrame, labels: Sequence[str], image_size: int, batch_size: int, name: str
) -> DataLoader:
    dataset = ManifestDataset(rows, labels, eval_transform(image_size), name)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


@torch.inference_mode()
def _logits(model: nn.Module, loader: DataLoader, device: torch.device) -> torch.Tensor:
    """Logits of every image of `loader`, in order, on the CPU."""
    model.eval()
    return torch.cat([model(images.to(device)).float().cpu() for images, _ in loader])


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
