"""Logs the `train_classifier` stage: metrics, predictions, figures and the model.

Synthetic images come from `generate_run_id`, else from a generate run found or run with the
generator options (as `generate` itself does), so `syn` and `real+syn` start from nothing too.
"""

import tempfile
from collections.abc import Callable, Mapping
from importlib.metadata import version
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pandas as pd
import torch
from mlflow.models import infer_signature

from skindiff.classify.data import build_training_set
from skindiff.classify.train import ClassifierConfig, ClassifierResult, train_classifier
from skindiff.data.prepare import PrepareConfig, content_digest
from skindiff.diffusion.generate import GenerateConfig
from skindiff.diffusion.lora import LoraConfig
from skindiff.diffusion.textual_inversion import TextualInversionConfig
from skindiff.errors import SkindiffError
from skindiff.options import (
    CLASSIFIER,
    DATA,
    GENERATE,
    LORA,
    TEXTUAL_INVERSION,
    option_values,
)
from skindiff.tracking.evaluate import log_evaluation
from skindiff.tracking.generate import ensure_generator_chain, load_synthetic
from skindiff.tracking.lora import upstream_key
from skindiff.tracking.prepare import ensure_prepare, load_split
from skindiff.tracking.reuse import RUN_KEY_TAG, find_finished_run, run_key
from skindiff.tracking.runs import stage_run
from skindiff.tracking.textual_inversion import PREPARE_RUN_TAG

STAGE = "train_classifier"
GENERATE_RUN_TAG = "skindiff.generate_run_id"
SPLITS = ("train", "val", "test")  # what a classifier is trained, selected and scored on


def log_classifier(result: ClassifierResult, config: ClassifierConfig) -> None:
    """The best epoch's model with its signature, labels and input size (for `evaluate`)."""
    example = np.zeros((1, 3, config.image_size, config.image_size), dtype=np.float32)
    with torch.no_grad():
        output = result.model(torch.from_numpy(example)).numpy()
    mlflow.pytorch.log_model(
        result.model,
        name="model",
        signature=infer_signature(example, output),
        input_example=example,
        # A plain nn.Module on load (the pt2 export format loads as a graph without eval());
        # the `tiny` architecture's class then comes from the installed skindiff.
        serialization_format="pickle",
        # Listed, not inferred: inference re-loads the model in a subprocess, slowly.
        # Installed distribution versions: `torch.__version__` carries a local label (+cu130)
        # that pip metadata lacks, and MLflow warns about the mismatch at every load.
        pip_requirements=[f"{name}=={version(name)}" for name in ("torch", "torchvision")],
        metadata={"labels": list(result.labels), "image_size": config.image_size},
    )


def classifier_key(
    config: ClassifierConfig, splits: Mapping[str, pd.DataFrame], generate_run_id: str
) -> str:
    """Same splits (train, val, test), settings, synthetic images and code: same classifier."""
    inputs = {name: content_digest(rows) for name, rows in splits.items()}
    inputs["synthetic"] = upstream_key(generate_run_id)
    return run_key(STAGE, option_values(CLASSIFIER, config), inputs)


def run_train_classifier(
    data: PrepareConfig,
    config: ClassifierConfig,
    ti_config: TextualInversionConfig,
    lora_config: LoraConfig,
    generate_config: GenerateConfig,
    prepare_run_id: str = "",
    generate_run_id: str = "",
    on_epoch: Callable[[int, float], None] | None = None,
) -> str:
    """Trains a classifier on real, synthetic or both; returns the run id. `on_epoch` gets
    (epoch, val_f1_macro) after every epoch."""
    params = option_values(DATA, data) | option_values(CLASSIFIER, config)
    if config.train_type != "real":
        for group, group_config in (
            (TEXTUAL_INVERSION, ti_config),
            (LORA, lora_config),
            (GENERATE, generate_config),
        ):
            params |= option_values(group, group_config)
    run_name = f"{data.scenario}/seed-{data.seed}/{config.arch}/{config.train_type}"
    with stage_run(STAGE, run_name, params | {"generate_run_id": generate_run_id}) as run:
        prepare_run_id = prepare_run_id or ensure_prepare(data)
        splits = {name: load_split(prepare_run_id, name) for name in SPLITS}
        train, val, test = splits.values()
        labels = tuple(sorted(data.conditions))
        with tempfile.TemporaryDirectory() as tmp:
            synthetic = None
            if config.train_type != "real":
                generate_run_id = (
                    generate_run_id
                    or ensure_generator_chain(
                        data, ti_config, lora_config, generate_config, prepare_run_id
                    )[2]
                )
                synthetic = load_synthetic(generate_run_id, Path(tmp))
            rows = build_training_set(train, synthetic, config.train_type)
            mlflow.set_tags(
                {
                    RUN_KEY_TAG: classifier_key(config, splits, generate_run_id),
                    PREPARE_RUN_TAG: prepare_run_id,
                    GENERATE_RUN_TAG: generate_run_id,
                }
            )
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
        log_evaluation(result.val_predictions, labels, "val")
        log_evaluation(result.test_predictions, labels, "test")
        log_classifier(result, config)
    return run.info.run_id


def ensure_train_classifier(
    data: PrepareConfig,
    config: ClassifierConfig,
    ti_config: TextualInversionConfig,
    lora_config: LoraConfig,
    generate_config: GenerateConfig,
    prepare_run_id: str,
    generate_run_id: str = "",
    on_epoch: Callable[[int, float], None] | None = None,
) -> str:
    """A finished classifier run with the same key, or a new one (nested under the active run).
    `generate_run_id` is the run of the synthetic images (made with the generator configs);
    "" for `train_type` real. `on_epoch` is called only when a classifier is trained."""
    if config.train_type == "real":
        generate_run_id = ""
    elif not generate_run_id:
        raise SkindiffError(f"train_type {config.train_type} needs a generate run")
    splits = {name: load_split(prepare_run_id, name) for name in SPLITS}
    found = find_finished_run(classifier_key(config, splits, generate_run_id))
    if found:
        return found.info.run_id
    return run_train_classifier(
        data,
        config,
        ti_config,
        lora_config,
        generate_config,
        prepare_run_id,
        generate_run_id,
        on_epoch,
    )
