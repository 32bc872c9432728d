"""The `ablation` stage: the paper's Table 5 protocol.

Scenario i; for each seed and each generation mode (txt2img vanilla/ti, img2img
vanilla/ti/lora/ti+lora) a classifier trained on that mode's synthetic images only, tested on
the dark flexible subset (scenario i's test split, so the classifier's own `test_` metrics) and
on the light flexible subset (an `evaluate` run named `light`). Every stage run is found or run,
so a second call trains and generates nothing.
"""

import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import mlflow
import pandas as pd
from tqdm.auto import tqdm

from skindiff.classify.train import ClassifierConfig
from skindiff.data.prepare import PrepareConfig
from skindiff.diffusion.generate import MODES, GenerateConfig
from skindiff.diffusion.lora import LoraConfig
from skindiff.diffusion.textual_inversion import TextualInversionConfig
from skindiff.options import CLASSIFIER, DATA, GENERATE, LORA, TEXTUAL_INVERSION, option_values
from skindiff.tracking.evaluate import EvaluateConfig, run_evaluate
from skindiff.tracking.generate import ensure_generator_chain
from skindiff.tracking.prepare import ensure_prepare
from skindiff.tracking.runs import ENTRY_POINT_TAG, stage_run
from skindiff.tracking.train_classifier import ensure_train_classifier

STAGE = "ablation"
ARTIFACT = "ablation.csv"
COLUMNS = ["seed", "mode", "test_set", "accuracy", "f1_macro", "classifier_run_id"]
# The options of the ablation command: the generate mode and the train type are the protocol's.
GENERATE_OPTIONS = replace(GENERATE, omit=("mode",))
CLASSIFIER_OPTIONS = replace(CLASSIFIER, omit=("train_type",), defaults=(("arch", "vgg16"),))


def mode_metric_name(test_set: str, metric: str, mode: str) -> str:
    """`light_accuracy_img2img_ti-lora`: MLflow metric names cannot hold '+'."""
    return f"{test_set}_{metric}_{mode.replace('/', '_').replace('+', '-')}"


def light_evaluation(classifier_run_id: str, manifest: str) -> dict[str, float]:
    """The classifier's `light_` metrics on `manifest`: from a finished evaluate run of the same
    model on the same manifest (both immutable artifacts), else from a new one."""
    config = EvaluateConfig(
        model_uri=f"runs:/{classifier_run_id}/model", manifest=manifest, name="light"
    )
    found = mlflow.search_runs(
        filter_string=f"tags.`{ENTRY_POINT_TAG}` = 'evaluate' and attributes.status = 'FINISHED'"
        f" and params.model_uri = '{config.model_uri}' and params.manifest = '{manifest}'"
        f" and params.name = '{config.name}'",
        max_results=1,
        output_format="list",
    )
    run_id = found[0].info.run_id if found else run_evaluate(config)
    return mlflow.get_run(run_id).data.metrics


def seed_rows(
    seed: int,
    data: PrepareConfig,
    ti_config: TextualInversionConfig,
    lora_config: LoraConfig,
    generate_config: GenerateConfig,
    classifier_config: ClassifierConfig,
    bar: tqdm,
) -> list[list]:
    """ablation.csv rows of one seed: every mode on the light and the dark flexible subset."""
    data = replace(data, scenario="i", seed=seed)
    ti, lora = replace(ti_config, seed=seed), replace(lora_config, seed=seed)
    classifier = replace(classifier_config, seed=seed, train_type="syn")
    prepare = ensure_prepare(data)
    rows = []
    for mode in MODES:
        bar.set_description(f"ablation seed {seed} {mode}")
        generate = replace(generate_config, seed=seed, mode=mode)
        generate_run = ensure_generator_chain(data, ti, lora, generate, prepare)[2]
        run_id = ensure_train_classifier(
            data, classifier, ti, lora, generate, prepare, generate_run
        )
        light = light_evaluation(run_id, f"runs:/{prepare}/splits/flexible_light.csv")
        dark = mlflow.get_run(run_id).data.metrics  # on scenario i's test split
        for test_set, metrics, prefix in (("light", light, "light"), ("dark", dark, "test")):
            accuracy, f1 = metrics[f"{prefix}_accuracy"], metrics[f"{prefix}_f1_macro"]
            rows.append([seed, mode, test_set, accuracy, f1, run_id])
        bar.update()
    return rows


def run_ablation(
    seeds: Sequence[int],
    data: PrepareConfig,
    ti_config: TextualInversionConfig,
    lora_config: LoraConfig,
    generate_config: GenerateConfig,
    classifier_config: ClassifierConfig,
) -> str:
    """Runs (or re-uses) every stage of Table 5 for each seed; logs `ablation.csv` (accuracy
    and macro F1 as fractions, per seed, mode and test set) and the means over seeds as
    metrics; returns the ablation run id."""
    configs = (data, ti_config, lora_config, generate_config, classifier_config)
    groups = (DATA, TEXTUAL_INVERSION, LORA, GENERATE_OPTIONS, CLASSIFIER_OPTIONS)
    params = {"seeds": ",".join(map(str, seeds))}
    for group, config in zip(groups, configs, strict=True):
        params |= option_values(group, config)
    del params["scenario"], params["seed"]
    with stage_run(STAGE, STAGE, params) as run, tqdm(total=len(seeds) * len(MODES)) as bar:
        rows = [row for seed in seeds for row in seed_rows(seed, *configs, bar)]
        table = pd.DataFrame(rows, columns=COLUMNS)
        with tempfile.TemporaryDirectory() as tmp:
            table.to_csv(Path(tmp) / ARTIFACT, index=False)
            mlflow.log_artifact(str(Path(tmp) / ARTIFACT))
        means = table.groupby(["test_set", "mode"])[["accuracy", "f1_macro"]].mean()
        mlflow.log_metrics(
            {
                mode_metric_name(test_set, metric, mode): float(value)
                for (test_set, mode), scores in means.iterrows()
                for metric, value in scores.items()
            }
        )
    return run.info.run_id
