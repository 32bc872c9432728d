"""Logs the `train_classifier` stage: metrics, predictions, figures and the model.

Synthetic images come from `generate_run_id`, else from a generate run found or run with the
generator options (as `generate` itself does), so `syn` and `real+syn` start from nothing too.
Without a validation split (val_fraction 0, selection last or test) no `val_` metric,
prediction or figure is logged, and the per-epoch curves have no `epoch_val_` metrics. The kept
epoch is the metric `best_epoch` (0: the initial weights, which only selection test keeps) and
the tag KEPT_EPOCH_TAG (its number, or "initial").
"""

import tempfile
from collections.abc import Callable, Iterable
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.models import infer_signature
from safetensors.torch import save_file

from skindiff.classify.config import Arch, ClassifierConfig, TrainType, require_validation
from skindiff.classify.data import build_training_set
from skindiff.classify.models import require_imagenet_files
from skindiff.classify.train import ClassifierResult, train_classifier
from skindiff.core.library_logs import LibraryMessage, without_messages
from skindiff.core.settings import as_text
from skindiff.data.config import PrepareConfig
from skindiff.diffusion.config import GenerateConfig, LoraConfig, TextualInversionConfig
from skindiff.options import CLASSIFIER, DATA, GENERATE, LORA, TEXTUAL_INVERSION
from skindiff.tracking.classifier_model import CODE_FILE, WEIGHTS
from skindiff.tracking.dry_run import WorkCost
from skindiff.tracking.evaluate import log_evaluation
from skindiff.tracking.generate import given_or_generated, load_synthetic, synthetic_count
from skindiff.tracking.names import CLASSIFIER_MODEL, KEPT_EPOCH_TAG, SELECTION_TAG, Stage
from skindiff.tracking.prepare import split_inputs
from skindiff.tracking.stage import StageCall, StageInputs, run_stage

SPLITS = ("train", "val", "test")  # what a classifier is trained, selected and scored on
# MLflow's note, at every classifier logged, that it checks the input example against the
# signature (a mismatch raises).
CHECKING_EXAMPLE = LibraryMessage("mlflow.pyfunc", "Validating input example against")


def log_classifier(result: ClassifierResult, config: ClassifierConfig) -> None:
    """The best epoch's model with its signature, labels and input size (for `evaluate`): its
    weights as safetensors and the code that rebuilds it (classifier_model.py), no pickle."""
    example = np.zeros((1, 3, config.image_size, config.image_size), dtype=np.float32)
    with torch.no_grad():
        output = result.model(torch.from_numpy(example)).numpy()
    packages = ["torch", "torchvision", "safetensors"]
    if config.arch.timm_name:
        packages.append("timm")
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "model.safetensors"
        # safetensors takes contiguous tensors only; a CPU-trained model's are channels-last.
        save_file({k: v.contiguous() for k, v in result.model.state_dict().items()}, weights)
        with without_messages(CHECKING_EXAMPLE):
            mlflow.pyfunc.log_model(
                name=CLASSIFIER_MODEL,
                python_model=CODE_FILE,
                artifacts={WEIGHTS: str(weights)},
                model_config={"arch": str(config.arch), "num_classes": len(result.labels)},
                signature=infer_signature(example, output),
                input_example=example,
                # Listed, not inferred: inference re-loads the model in a subprocess, slowly.
                # Installed distribution versions: `torch.__version__` carries a local label
                # (+cu130) that pip metadata lacks, and MLflow warns about the mismatch at every
                # load.
                pip_requirements=[f"{name}=={version(name)}" for name in packages],
                metadata={"labels": list(result.labels), "image_size": config.image_size},
            )


def check_classifiers(data: PrepareConfig, config: ClassifierConfig, archs: Iterable[Arch]) -> None:
    """Refuses at once, before any run is made, what would otherwise fail only when a classifier
    of `archs` starts, after the generators have trained: settings invalid for an arch (vit_b_16
    at another image size, ...), selection on a validation split val_fraction does not make,
    and missing ImageNet weight files (all of them in one error)."""
    configs = [replace(config, arch=arch) for arch in archs]  # each checks its own settings
    require_validation(
        config.selection, data.val_fraction > 0, f"val_fraction is {data.val_fraction}"
    )
    require_imagenet_files([c.arch for c in configs], config.weights)


def _classifier_cost(config: ClassifierConfig, inputs: StageInputs) -> WorkCost:
    """Every epoch goes over the training set: the real training split and the synthetic
    images its train type takes."""
    images = 0 if config.train_type == TrainType.SYN else len(inputs.splits["train"])
    generate = inputs.upstream.get(Stage.GENERATE)
    if generate:
        images += synthetic_count(generate)
    return WorkCost(images=images, image_epochs=images * config.epochs)


def run_train_classifier(
    data: PrepareConfig,
    config: ClassifierConfig,
    ti_config: TextualInversionConfig,
    lora_config: LoraConfig,
    generate_config: GenerateConfig,
    prepare_run_id: str | None = None,
    generate_run_id: str | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    *,
    reuse: bool = False,
) -> str:
    """Trains a classifier on real, synthetic or both; returns the run id (with `reuse`, of a
    finished run with the same key where there is one). `on_epoch` gets (epoch,
    val_f1_macro) after every epoch it trains, when there is a validation split."""
    check_classifiers(data, config, [config.arch])
    synthetic = config.train_type != TrainType.REAL
    context = DATA.values(data)
    if synthetic:
        for group, group_config in (
            (TEXTUAL_INVERSION, ti_config),
            (LORA, lora_config),
            (GENERATE, generate_config),
        ):
            context |= group.values(group_config)
    context |= {"generate_run_id": as_text(generate_run_id if synthetic else None)}
    call = StageCall(
        Stage.TRAIN_CLASSIFIER,
        f"{data.scenario}/seed-{data.seed}/{config.arch}/{config.train_type}",
        CLASSIFIER.values(config),
        context,
        f"{config.epochs} epochs",
        cost=lambda inputs: _classifier_cost(config, inputs),
    )

    def resolve() -> StageInputs:
        inputs = split_inputs(data, prepare_run_id, SPLITS)
        generate = None
        if synthetic:
            generate = given_or_generated(
                generate_run_id,
                data,
                ti_config,
                lora_config,
                generate_config,
                inputs.prepare_run_id,
            )
        inputs.upstream[Stage.GENERATE] = generate
        return inputs

    def work(inputs: StageInputs, key: str) -> None:
        train, val, test = (inputs.splits[name] for name in SPLITS)
        labels = data.cohort.labels
        with tempfile.TemporaryDirectory() as tmp:
            generate = inputs.upstream[Stage.GENERATE]
            images = load_synthetic(generate, Path(tmp)) if generate else None
            rows = build_training_set(train, images, config.train_type)
            mlflow.log_metrics(
                {
                    "n_train_real": float((rows["source"] == "real").sum()),
                    "n_train_synthetic": float((rows["source"] == "synthetic").sum()),
                }
            )
            result = train_classifier(config, rows, val, test, labels, on_epoch=on_epoch)
        for _, epoch in result.history.iterrows():
            step = int(epoch["epoch"])
            for name, value in epoch.drop("epoch").items():
                mlflow.log_metric(f"epoch_{name}", float(value), step=step)
        mlflow.log_metric("best_epoch", result.best_epoch)
        mlflow.set_tag(KEPT_EPOCH_TAG, str(result.best_epoch or "initial"))
        mlflow.set_tag(SELECTION_TAG, str(config.selection))
        if result.val_predictions is not None:
            log_evaluation(result.val_predictions, labels, "val")
        log_evaluation(result.test_predictions, labels, "test")
        log_classifier(result, config)

    return run_stage(call, resolve, work, reuse=reuse)
