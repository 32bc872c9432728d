"""The `main` pipeline: one parent run per (scenario, seed), a child run per stage.

Each stage is found (a finished run with the same key) or run; so a second call re-uses
everything, and a call after a failure or a kill resumes at the stage that did not finish.
Workers sharing a study each run the pairs of their shard (`StudyPlan.shard`) in `main` runs
of their own; a stage one of them finished is re-used by the others, and one in progress is
waited for by those sharing its cache (`run_stage`).
A pair's parent run lists its classifier runs in `results.csv`, which `report` reads.
"""

import logging
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlflow
import pandas as pd

from skindiff.classify.config import Arch, TrainType
from skindiff.data.config import Scenario
from skindiff.errors import SkindiffError
from skindiff.options import MAIN_STUDY, STUDY, StudyConfigs
from skindiff.plans import StudyPlan
from skindiff.tracking.frozen import read_frozen_params, tune_run_frozen_params
from skindiff.tracking.generate import ensure_generator_chain
from skindiff.tracking.names import (
    FROZEN_PARAM_PREFIX,
    FROZEN_PARAMS_TAG,
    RESULTS_FILE,
    SCENARIO_TAG,
    Stage,
)
from skindiff.tracking.prepare import ensure_prepare
from skindiff.tracking.registry import generator_frozen_params
from skindiff.tracking.server import unreachable_server
from skindiff.tracking.stage import child_runs, open_stage_run
from skindiff.tracking.train_classifier import check_classifiers, run_train_classifier

logger = logging.getLogger(__name__)

RESULT_COLUMNS = [
    "scenario",
    "seed",
    "arch",
    "train_type",
    "run_id",
    "test_accuracy",
    "test_f1_macro",
]


@dataclass(frozen=True)
class PipelineRuns:
    """Run ids of one (scenario, seed); None for the generator stages when nothing synthetic
    was asked for (or the mode does not use them)."""

    parent: str
    prepare: str
    textual_inversion: str | None
    lora: str | None
    generate: str | None
    classifiers: dict[tuple[Arch, TrainType], str] = field(default_factory=dict)


def load_frozen_params(source: str) -> dict[str, str]:
    """Frozen params from a `tune` run id, a YAML file, or a generator model URI
    (`models:/skin-diff-generator@champion`, `runs:/<id>/generator`)."""
    if source.startswith(("models:/", "runs:/")):
        return generator_frozen_params(source)
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise SkindiffError(f"frozen params file not found: {source}")
        return read_frozen_params(path)
    return tune_run_frozen_params(source)


def run_main(plan: StudyPlan, configs: StudyConfigs) -> dict[tuple[Scenario, int], PipelineRuns]:
    """Runs every stage for each (scenario, seed) pair of `plan`'s shard; returns the run ids
    of each pair (none, with a warning, for a shard without a pair).

    `plan.frozen_params` (a tune run id, a YAML file or a generator model URI) replaces the
    tuned settings. Classifier settings that cannot train (missing ImageNet weight files,
    selection val without a validation split) are refused before any run is made. A failing
    stage leaves its run FAILED and stops the pipeline with a SkindiffError saying which run
    failed; finished stages are re-used by the next call."""
    pairs = plan.pairs()
    if not pairs:
        n_pairs = len(plan.scenarios) * len(plan.seeds)
        logger.warning("shard %s has none of the %d pairs: nothing to run", plan.shard, n_pairs)
        return {}
    frozen = load_frozen_params(plan.frozen_params) if plan.frozen_params else {}
    if frozen:
        configs = configs.with_frozen(frozen, plan.frozen_params)
    check_classifiers(configs.data, configs.classifier, plan.archs)
    results = {}
    params = STUDY.values(plan) | MAIN_STUDY.values(configs)
    with open_stage_run(Stage.MAIN, str(Stage.MAIN), params):
        if frozen:
            # `mlflow run` has logged the command-line values of these; the used ones are here.
            mlflow.log_params({FROZEN_PARAM_PREFIX + name: value for name, value in frozen.items()})
            mlflow.set_tag(FROZEN_PARAMS_TAG, plan.frozen_params)
        for scenario, seed in pairs:
            with open_stage_run(
                Stage.MAIN,
                f"{scenario}/seed-{seed}",
                {"scenario": str(scenario), "seed": str(seed)},
                {SCENARIO_TAG: str(scenario)},
            ) as parent:
                try:
                    runs = _run_pair(configs.for_pair(scenario, seed), plan)
                except Exception as err:
                    if unreachable_server(err):
                        raise  # the CLI says so in one line; nobody can ask the server what failed
                    raise _stopped(parent.info.run_id, err) from err
                results[(scenario, seed)] = replace(runs, parent=parent.info.run_id)
                _log_results(scenario, seed, runs.classifiers)
    return results


def _run_pair(configs: StudyConfigs, plan: StudyPlan) -> PipelineRuns:
    data = configs.data
    prepare = ensure_prepare(data)
    ti = lora = generate = None
    if any(train_type != TrainType.REAL for train_type in plan.train_types):
        ti, lora, generate = ensure_generator_chain(
            data, configs.textual_inversion, configs.lora, configs.generate, prepare
        )
    classifiers = {}
    for arch in plan.archs:
        for train_type in plan.train_types:
            classifiers[(arch, train_type)] = run_train_classifier(
                data,
                replace(configs.classifier, arch=arch, train_type=train_type),
                configs.textual_inversion,
                configs.lora,
                configs.generate,
                prepare,
                generate,
                reuse=True,
            )
    return PipelineRuns("", prepare, ti, lora, generate, classifiers)


def _stopped(parent_run_id: str, err: Exception) -> SkindiffError:
    """The one-line reason the pipeline stopped: which stage run failed, and why."""
    if not isinstance(err, SkindiffError):
        logger.error("unexpected failure", exc_info=err)
    failed = child_runs(mlflow.get_run(parent_run_id), "FAILED")
    where = ", ".join(f"{run.info.run_name} (run {run.info.run_id})" for run in failed)
    return SkindiffError(
        f"main stopped: {where or 'a stage'} failed: {err}. Finished stages are kept; run the "
        "same command again to resume from the failed one."
    )


def _log_results(
    scenario: Scenario, seed: int, classifiers: dict[tuple[Arch, TrainType], str]
) -> None:
    rows = []
    for (arch, train_type), run_id in classifiers.items():
        metrics = mlflow.get_run(run_id).data.metrics
        rows.append(
            [
                str(scenario),
                seed,
                str(arch),
                str(train_type),
                run_id,
                metrics.get("test_accuracy"),
                metrics.get("test_f1_macro"),
            ]
        )
        # One metric per classifier on the parent, for the MLflow compare view.
        mlflow.log_metric(f"test_f1_macro.{arch}.{str(train_type).replace('+', '_')}", rows[-1][-1])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / RESULTS_FILE
        pd.DataFrame(rows, columns=RESULT_COLUMNS).to_csv(path, index=False)
        mlflow.log_artifact(str(path))
