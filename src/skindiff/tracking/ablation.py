"""The `ablation` stage: the paper's Table 5 protocol.

Scenario i; for each seed and each generation mode (txt2img vanilla/ti, img2img
vanilla/ti/lora/ti+lora) a classifier trained on that mode's synthetic images only, tested on
the dark flexible subset (scenario i's test split, so the classifier's own `test_` metrics) and
on the light flexible subset (an `evaluate` run named `light`). Every stage run is found or run,
so a second call trains and generates nothing.
"""

import tempfile
from dataclasses import replace
from pathlib import Path

import mlflow
import pandas as pd
from tqdm.auto import tqdm

from skindiff.classify.config import TrainType
from skindiff.data.config import Scenario
from skindiff.diffusion.config import (
    GenerationMode,
)
from skindiff.options import ABLATION, ABLATION_STUDY, StudyConfigs
from skindiff.plans import AblationPlan
from skindiff.tracking.dry_run import DryRun, plan_group, planning
from skindiff.tracking.evaluate import evaluate_on_light
from skindiff.tracking.generate import ensure_generator_chain
from skindiff.tracking.names import ABLATION_FILE, Stage
from skindiff.tracking.prepare import ensure_prepare
from skindiff.tracking.stage import open_stage_run
from skindiff.tracking.train_classifier import check_classifiers, run_train_classifier

COLUMNS = ["seed", "mode", "test_set", "accuracy", "f1_macro", "classifier_run_id"]


def mode_metric_name(test_set: str, metric: str, mode: GenerationMode) -> str:
    """`light_accuracy_img2img_ti-lora`: MLflow metric names cannot hold '+'."""
    return f"{test_set}_{metric}_{mode.replace('/', '_').replace('+', '-')}"


def mode_runs(
    seed: int, configs: StudyConfigs, mode: GenerationMode, prepare: str
) -> tuple[str, str]:
    """(classifier run, its light evaluation run) of one seed and mode, found or run."""
    configs = configs.for_pair(Scenario.I, seed)
    data, ti, lora = configs.data, configs.textual_inversion, configs.lora
    classifier = replace(configs.classifier, train_type=TrainType.SYN)
    generate = replace(configs.generate, mode=mode)
    generate_run = ensure_generator_chain(data, ti, lora, generate, prepare)[2]
    run_id = run_train_classifier(
        data, classifier, ti, lora, generate, prepare, generate_run, reuse=True
    )
    return run_id, evaluate_on_light(run_id, prepare)


def plan_ablation(plan: AblationPlan, configs: StudyConfigs) -> DryRun:
    """What `run_ablation` would run and re-use (see `dry_run`); nothing runs."""
    check_classifiers(configs.data, configs.classifier, [configs.classifier.arch])
    with planning() as dry:
        for seed in plan.seeds:
            with plan_group(f"{Scenario.I}/seed-{seed}"):
                prepare = ensure_prepare(configs.for_pair(Scenario.I, seed).data)
                for mode in GenerationMode:
                    mode_runs(seed, configs, mode, prepare)
    return dry


def seed_rows(seed: int, configs: StudyConfigs, bar: tqdm) -> list[list]:
    """ablation.csv rows of one seed: every mode on the light and the dark flexible subset."""
    prepare = ensure_prepare(configs.for_pair(Scenario.I, seed).data)
    rows = []
    for mode in GenerationMode:
        bar.set_description(f"ablation seed {seed} {mode}")
        run_id, light_run = mode_runs(seed, configs, mode, prepare)
        light = mlflow.get_run(light_run).data.metrics
        dark = mlflow.get_run(run_id).data.metrics  # on scenario i's test split
        for test_set, metrics, prefix in (("light", light, "light"), ("dark", dark, "test")):
            accuracy, f1 = metrics[f"{prefix}_accuracy"], metrics[f"{prefix}_f1_macro"]
            rows.append([seed, str(mode), test_set, accuracy, f1, run_id])
        bar.update()
    return rows


def run_ablation(plan: AblationPlan, configs: StudyConfigs) -> str:
    """Runs (or re-uses) every stage of Table 5 for each seed; logs `ablation.csv` (accuracy
    and macro F1 as fractions, per seed, mode and test set) and the means over seeds as
    metrics; returns the ablation run id. The classifier's settings are checked (ImageNet
    weight files, a validation split for selection val) before any run is made."""
    check_classifiers(configs.data, configs.classifier, [configs.classifier.arch])
    params = ABLATION.values(plan) | ABLATION_STUDY.values(configs)
    seeds = plan.seeds
    with (
        open_stage_run(Stage.ABLATION, str(Stage.ABLATION), params) as run,
        tqdm(total=len(seeds) * len(GenerationMode)) as bar,
    ):
        rows = [row for seed in seeds for row in seed_rows(seed, configs, bar)]
        table = pd.DataFrame(rows, columns=COLUMNS)
        with tempfile.TemporaryDirectory() as tmp:
            table.to_csv(Path(tmp) / ABLATION_FILE, index=False)
            mlflow.log_artifact(str(Path(tmp) / ABLATION_FILE))
        means = table.groupby(["test_set", "mode"])[["accuracy", "f1_macro"]].mean()
        mlflow.log_metrics(
            {
                mode_metric_name(test_set, metric, mode): float(value)
                for (test_set, mode), scores in means.iterrows()
                for metric, value in scores.items()
            }
        )
    return run.info.run_id
