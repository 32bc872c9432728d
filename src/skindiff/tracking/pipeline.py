"""The `main` pipeline: one parent run per (scenario, seed), a child run per stage.

Each stage is found (a finished run with the same key) or run; so a second call re-uses
everything, and a call after a failure or a kill resumes at the stage that did not finish.
A pair's parent run lists its classifier runs in `results.csv`, which `report` reads.
"""

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlflow
import pandas as pd

from skindiff.classify.data import TRAIN_TYPES
from skindiff.classify.models import ARCHS, PAPER_ARCHS
from skindiff.classify.train import ClassifierConfig
from skindiff.data.prepare import PrepareConfig
from skindiff.data.splits import SCENARIOS
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
    with_options,
)
from skindiff.tracking.frozen import load_frozen_params
from skindiff.tracking.generate import ensure_generator_chain
from skindiff.tracking.prepare import ensure_prepare
from skindiff.tracking.runs import ENTRY_POINT_TAG, stage_run
from skindiff.tracking.train_classifier import ensure_train_classifier

logger = logging.getLogger(__name__)

SCENARIO_TAG = "skindiff.scenario"
FROZEN_PARAMS_TAG = "skindiff.frozen_params"
RESULTS_FILE = "results.csv"


@dataclass(frozen=True)
class StudyConfigs:
    """The settings of every stage; `for_pair` gives those of one (scenario, seed)."""

    data: PrepareConfig
    textual_inversion: TextualInversionConfig
    lora: LoraConfig
    generate: GenerateConfig
    classifier: ClassifierConfig

    def groups(self) -> tuple:
        """(option group, config) of each stage, in pipeline order."""
        return (
            (DATA, self.data),
            (TEXTUAL_INVERSION, self.textual_inversion),
            (LORA, self.lora),
            (GENERATE, self.generate),
            (CLASSIFIER, self.classifier),
        )

    def with_frozen(self, frozen: dict[str, str], source: str) -> "StudyConfigs":
        """These settings with the frozen ones replacing theirs; unknown names are refused."""
        known = {name for group, _ in self.groups() for name, _, _ in group.option_fields()}
        unknown = sorted(set(frozen) - known)
        if unknown:
            raise SkindiffError(f"frozen params {source}: unknown option(s) {', '.join(unknown)}")
        return StudyConfigs(*(with_options(g, c, frozen) for g, c in self.groups()))

    def for_pair(self, scenario: str, seed: int) -> "StudyConfigs":
        return StudyConfigs(
            replace(self.data, scenario=scenario, seed=seed),
            replace(self.textual_inversion, seed=seed),
            replace(self.lora, seed=seed),
            replace(self.generate, seed=seed),
            replace(self.classifier, seed=seed),
        )


@dataclass(frozen=True)
class PipelineRuns:
    """Run ids of one (scenario, seed); "" for the generator stages when nothing synthetic
    was asked for."""

    parent: str
    prepare: str
    textual_inversion: str
    lora: str
    generate: str
    classifiers: dict[tuple[str, str], str] = field(default_factory=dict)  # (arch, type) -> id


def check_choices(
    scenarios: Sequence[str], archs: Sequence[str], train_types: Sequence[str]
) -> None:
    """Refuses unknown scenarios, architectures or train types before anything runs."""
    for name, chosen, allowed in (
        ("scenarios", scenarios, SCENARIOS),
        ("archs", archs, ARCHS),
        ("train_types", train_types, TRAIN_TYPES),
    ):
        unknown = [value for value in chosen if value not in allowed]
        if unknown or not chosen:
            raise SkindiffError(
                f"{name} must be a comma list of {', '.join(allowed)}, got {','.join(chosen)!r}"
            )


def run_main(
    scenarios: Sequence[str],
    seeds: Sequence[int],
    configs: StudyConfigs,
    archs: Sequence[str] = PAPER_ARCHS,
    train_types: Sequence[str] = TRAIN_TYPES,
    frozen_params: str = "",
) -> dict[tuple[str, int], PipelineRuns]:
    """Runs every stage for each scenario and seed; returns the run ids of each pair.

    `frozen_params` (a tune run id, a YAML file or a generator model URI) replaces the tuned
    settings. A failing stage leaves its run FAILED and stops the pipeline with a SkindiffError
    saying which run failed; finished stages are re-used by the next call."""
    check_choices(scenarios, archs, train_types)
    frozen = load_frozen_params(frozen_params) if frozen_params else {}
    if frozen:
        configs = configs.with_frozen(frozen, frozen_params)
    params = {
        "scenarios": ",".join(scenarios),
        "seeds": ",".join(map(str, seeds)),
        "archs": ",".join(archs),
        "train_types": ",".join(train_types),
        "frozen_params": frozen_params,
    }
    for group, config in configs.groups():
        params |= option_values(group, config)
    for name in ("scenario", "seed", "arch", "train_type"):
        del params[name]
    results = {}
    with stage_run("main", "main", params):
        if frozen:
            # `mlflow run` has logged the command-line values of these; the used ones are here.
            mlflow.log_params({f"frozen.{name}": value for name, value in frozen.items()})
            mlflow.set_tag(FROZEN_PARAMS_TAG, frozen_params)
        for scenario in scenarios:
            for seed in seeds:
                with mlflow.start_run(
                    run_name=f"{scenario}/seed-{seed}",
                    nested=True,
                    tags={ENTRY_POINT_TAG: "main", SCENARIO_TAG: scenario},
                ) as parent:
                    mlflow.log_params({"scenario": scenario, "seed": seed})
                    try:
                        runs = _run_pair(configs.for_pair(scenario, seed), archs, train_types)
                    except Exception as err:
                        raise _stopped(parent.info.run_id, err) from err
                    results[(scenario, seed)] = replace(runs, parent=parent.info.run_id)
                    _log_results(scenario, seed, runs.classifiers)
    return results


def _run_pair(
    configs: StudyConfigs, archs: Sequence[str], train_types: Sequence[str]
) -> PipelineRuns:
    data = configs.data
    prepare = ensure_prepare(data)
    ti = lora = generate = ""
    if any(train_type != "real" for train_type in train_types):
        ti, lora, generate = ensure_generator_chain(
            data, configs.textual_inversion, configs.lora, configs.generate, prepare
        )
    classifiers = {}
    for arch in archs:
        for train_type in train_types:
            classifiers[(arch, train_type)] = ensure_train_classifier(
                data,
                replace(configs.classifier, arch=arch, train_type=train_type),
                configs.textual_inversion,
                configs.lora,
                configs.generate,
                prepare,
                generate,
            )
    return PipelineRuns("", prepare, ti, lora, generate, classifiers)


def _stopped(parent_run_id: str, err: Exception) -> SkindiffError:
    """The one-line reason the pipeline stopped: which stage run failed, and why."""
    if not isinstance(err, SkindiffError):
        logger.error("unexpected failure", exc_info=err)
    failed = mlflow.search_runs(
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' "
        "and attributes.status = 'FAILED'",
        output_format="list",
    )
    where = ", ".join(f"{run.info.run_name} (run {run.info.run_id})" for run in failed)
    return SkindiffError(
        f"main stopped: {where or 'a stage'} failed: {err}. Finished stages are kept; run the "
        "same command again to resume from the failed one."
    )


def _log_results(scenario: str, seed: int, classifiers: dict[tuple[str, str], str]) -> None:
    rows = []
    for (arch, train_type), run_id in classifiers.items():
        metrics = mlflow.get_run(run_id).data.metrics
        rows.append(
            {
                "scenario": scenario,
                "seed": seed,
                "arch": arch,
                "train_type": train_type,
                "run_id": run_id,
                "test_accuracy": metrics.get("test_accuracy"),
                "test_f1_macro": metrics.get("test_f1_macro"),
            }
        )
        # One metric per classifier on the parent, for the MLflow compare view.
        mlflow.log_metric(
            f"test_f1_macro.{arch}.{train_type.replace('+', '_')}", rows[-1]["test_f1_macro"]
        )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / RESULTS_FILE
        pd.DataFrame(
            rows,
            columns=[
                "scenario",
                "seed",
                "arch",
                "train_type",
                "run_id",
                "test_accuracy",
                "test_f1_macro",
            ],
        ).to_csv(path, index=False)
        mlflow.log_artifact(str(path))
