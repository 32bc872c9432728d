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
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from skindiff.classify.config import Arch, TrainType
from skindiff.data.cohort import select_cohort
from skindiff.data.config import PrepareConfig, Scenario
from skindiff.data.metadata import read_metadata
from skindiff.data.prepare import resolve_dataset
from skindiff.errors import SkindiffError
from skindiff.options import MAIN_STUDY, STUDY, StudyConfigs
from skindiff.plans import StudyPlan
from skindiff.tracking.dry_run import DryRun, plan_group, planning
from skindiff.tracking.evaluate import evaluate_on_light
from skindiff.tracking.frozen import (
    FrozenSource,
    TunedSettings,
    read_frozen_params,
    tune_run_source,
    tuning_overlap,
)
from skindiff.tracking.generate import ensure_generator_chain
from skindiff.tracking.names import (
    ENTRY_POINT_TAG,
    FROZEN_PARAM_PREFIX,
    FROZEN_PARAMS_SEED_PARAM,
    FROZEN_PARAMS_TAG,
    QUALITY_RUN_TAG,
    RESULTS_FILE,
    SCENARIO_TAG,
    SCORED_BY_TUNING_METRIC,
    SHARD_RESOLVED_PARAM,
    SPLITS_DIR,
    TUNE_PROTOCOL_TAG,
    TUNING_OVERLAP_FILE,
    Stage,
    split_artifact,
)
from skindiff.tracking.prepare import ensure_prepare
from skindiff.tracking.registry import generator_frozen_params
from skindiff.tracking.runs import load_split
from skindiff.tracking.server import unreachable_server
from skindiff.tracking.stage import child_runs, open_stage_run
from skindiff.tracking.synthetic_quality import run_synthetic_quality
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
    "light_run_id",  # the evaluate run on the light flexible subset; empty without light_test
    "light_accuracy",
    "light_f1_macro",
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
    # per classifier, its evaluate run on the light flexible subset (with plan.light_test)
    light_evaluations: dict[tuple[Arch, TrainType], str] = field(default_factory=dict)
    synthetic_quality: str | None = None  # the generate run's scores (plan.synthetic_quality)


def load_frozen_source(source: str) -> FrozenSource:
    """Frozen params from a `tune` run id (with seeds: one set per seed), a YAML file, or a
    generator model URI (`models:/skin-diff-generator@champion`, `runs:/<id>/generator`)."""
    if source.startswith(("models:/", "runs:/")):
        return FrozenSource(
            source, shared=TunedSettings(generator_frozen_params(source), _tune_run_of(source))
        )
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise SkindiffError(f"frozen params file not found: {source}")
        return FrozenSource(source, shared=TunedSettings(read_frozen_params(path)))
    return tune_run_source(source)


def load_frozen_params(source: str) -> dict[str, str]:
    """The one set of frozen params of `source` (see load_frozen_source); a tune run with seeds
    has one per seed and is refused."""
    found = load_frozen_source(source)
    if found.shared is None:
        seeds = ",".join(map(str, found.by_seed))
        raise SkindiffError(f"frozen params {source} were tuned per seed ({seeds}): name a seed")
    return found.shared.params


def _tune_run_of(model_uri: str) -> Run | None:
    """The tune run that logged a generator model, where it was one (its data seed is known)."""
    try:
        run = mlflow.get_run(mlflow.models.get_model_info(model_uri).run_id)
    except (MlflowException, OSError):
        return None
    return run if run.data.tags.get(ENTRY_POINT_TAG) == Stage.TUNE else None


def _pair_configs(
    plan: StudyPlan, configs: StudyConfigs
) -> tuple[FrozenSource | None, dict[int, TunedSettings], dict[int, StudyConfigs]]:
    """(the frozen settings' source or None, the tuned settings per seed, the configs per
    seed); the classifier settings checked before any run is made."""
    source = load_frozen_source(plan.frozen_params) if plan.frozen_params else None
    tuned = source.for_seeds(plan.seeds, plan.frozen_fallback_seed) if source else {}
    seed_configs = {
        seed: configs.with_frozen(settings.params, plan.frozen_params)
        for seed, settings in tuned.items()
    }
    for used in set(seed_configs.values()) or {configs}:
        check_classifiers(used.data, used.classifier, plan.archs)
    return source, tuned, seed_configs


def plan_main(plan: StudyPlan, configs: StudyConfigs) -> DryRun:
    """What `run_main` would run, stage by stage, and what it would re-use: the same calls,
    under `dry_run.planning`, so nothing runs."""
    _, _, seed_configs = _pair_configs(plan, configs)
    with planning() as dry:
        for scenario, seed in plan.pairs():
            with plan_group(f"{scenario}/seed-{seed}"):
                _run_pair(seed_configs.get(seed, configs).for_pair(scenario, seed), plan)
    return dry


def run_main(plan: StudyPlan, configs: StudyConfigs) -> dict[tuple[Scenario, int], PipelineRuns]:
    """Runs every stage for each (scenario, seed) pair of `plan`'s shard; returns the run ids
    of each pair (none, with a warning, for a shard without a pair).

    `plan.frozen_params` (a tune run id, a YAML file or a generator model URI) replaces the
    tuned settings: a tune run with seeds gives each seed its own (`plan.frozen_fallback_seed`'s
    to a seed without), any other source one set to all. Each pair run records the seed its
    settings were tuned on and how many of its test images scored the tuning objective
    (`tuning_overlap.csv` on the main run lists them). A seed without settings, and classifier
    settings that cannot train (missing ImageNet weight files, selection val without a
    validation split), are refused before any run is made. A failing stage leaves its run
    FAILED and stops the pipeline with a SkindiffError saying which run failed; finished
    stages are re-used by the next call."""
    pairs = plan.pairs()
    if not pairs:
        n_pairs = len(plan.scenarios) * len(plan.seeds)
        shard = plan.resolved_shard()
        logger.warning("shard %s has none of the %d pairs: nothing to run", shard, n_pairs)
        return {}
    source, tuned, seed_configs = _pair_configs(plan, configs)
    # With one set of settings for all, the main run's params show them.
    shared = source is not None and source.shared is not None
    shown = seed_configs[plan.seeds[0]] if shared else configs
    results, overlap = {}, []
    params = STUDY.values(plan) | MAIN_STUDY.values(shown)
    # `shard` as given (`mlflow run` logs it so, `auto` under SLURM); this, which worker it was.
    params[SHARD_RESOLVED_PARAM] = plan.resolved_shard()
    with open_stage_run(Stage.MAIN, str(Stage.MAIN), params):
        if source:
            # `mlflow run` has logged the command-line values of these; the used ones are here.
            mlflow.log_params(_frozen_summary(tuned, plan.seeds))
            protocols = {s.protocol for s in tuned.values()} - {None}
            mlflow.set_tags(
                {FROZEN_PARAMS_TAG: plan.frozen_params}
                | ({TUNE_PROTOCOL_TAG: protocols.pop()} if len(protocols) == 1 else {})
            )
        for scenario, seed in pairs:
            pair_params = {"scenario": str(scenario), "seed": str(seed)}
            if seed in tuned:
                pair_params |= _frozen_pair_params(tuned[seed])
            with open_stage_run(
                Stage.MAIN,
                f"{scenario}/seed-{seed}",
                pair_params,
                {SCENARIO_TAG: str(scenario)},
            ) as parent:
                pair_configs = seed_configs.get(seed, configs).for_pair(scenario, seed)
                try:
                    runs = _run_pair(pair_configs, plan)
                except Exception as err:
                    if unreachable_server(err):
                        raise  # the CLI says so in one line; nobody can ask the server what failed
                    raise _stopped(parent.info.run_id, err) from err
                results[(scenario, seed)] = replace(runs, parent=parent.info.run_id)
                _log_results(scenario, seed, runs)
                if runs.synthetic_quality:
                    mlflow.set_tag(QUALITY_RUN_TAG, runs.synthetic_quality)
                if seed in tuned:
                    counted = _scored_by_tuning(tuned[seed], pair_configs.data, runs.prepare)
                    if counted is not None:
                        mlflow.log_metric(
                            SCORED_BY_TUNING_METRIC, counted["n_scored_by_tuning"].iloc[0]
                        )
                        overlap.append(counted)
        if overlap:
            _log_table(pd.concat(overlap, ignore_index=True), TUNING_OVERLAP_FILE)
    return results


def _frozen_pair_params(settings: TunedSettings) -> dict[str, str]:
    """The params of a pair run with frozen settings: the values and the seed they were tuned
    on."""
    seed = "unknown" if settings.seed is None else str(settings.seed)
    frozen = {FROZEN_PARAM_PREFIX + name: value for name, value in settings.params.items()}
    return frozen | {FROZEN_PARAMS_SEED_PARAM: seed}


def _frozen_summary(tuned: dict[int, TunedSettings], seeds: Sequence[int]) -> dict[str, str]:
    """The params of the main run with frozen settings: those of its pairs (`frozen.<name>`,
    the seed tuned on), each with the value of every seed of the plan, or `seed=value` per seed
    where they differ ("": not frozen for that seed). Made from the plan's seeds, not the
    shard's, so that the report groups the pairs of every shard together."""
    per_seed = {seed: _frozen_pair_params(tuned[seed]) for seed in seeds}
    names = dict.fromkeys(name for params in per_seed.values() for name in params)
    summary = {}
    for name in names:
        values = {seed: params.get(name, "") for seed, params in per_seed.items()}
        same = len(set(values.values())) == 1
        summary[name] = (
            values[seeds[0]] if same else ",".join(f"{s}={v}" for s, v in values.items())
        )
    return summary


def _scored_by_tuning(
    settings: TunedSettings, data: PrepareConfig, prepare: str
) -> pd.DataFrame | None:
    """The pair's row of TUNING_OVERLAP_COLUMNS: how many of its test images scored the
    objective that tuned `settings`, rebuilt from the data; None where the tune is unknown or
    used other data."""
    tuned_on = settings.tuned_on(data)
    if tuned_on is None:
        return None
    source = resolve_dataset(data)
    cohort = select_cohort(read_metadata(source.metadata_csv), data.cohort)
    dropped = _dropped_images(prepare)
    cohort = cohort[~cohort["md5hash"].isin(dropped)].reset_index(drop=True)
    return tuning_overlap(
        cohort, tuned_on, [(data.scenario, data.seed)], data.flexible_per_condition
    )


def _dropped_images(prepare_run_id: str) -> set[str]:
    """The md5hashes of the rows a prepare run dropped (skip_missing): its
    splits/dropped_images.csv, logged where it dropped any."""
    dropped = split_artifact("dropped_images")
    listed = mlflow.MlflowClient().list_artifacts(prepare_run_id, SPLITS_DIR)
    if dropped not in {item.path for item in listed}:
        return set()
    return set(load_split(prepare_run_id, "dropped_images")["md5hash"].astype(str))


def _run_pair(configs: StudyConfigs, plan: StudyPlan) -> PipelineRuns:
    data = configs.data
    prepare = ensure_prepare(data)
    ti = lora = generate = None
    if any(train_type != TrainType.REAL for train_type in plan.train_types):
        ti, lora, generate = ensure_generator_chain(
            data, configs.textual_inversion, configs.lora, configs.generate, prepare
        )
    classifiers, light = {}, {}
    for arch in plan.archs:
        for train_type in plan.train_types:
            run_id = run_train_classifier(
                data,
                replace(configs.classifier, arch=arch, train_type=train_type),
                configs.textual_inversion,
                configs.lora,
                configs.generate,
                prepare,
                generate,
                reuse=True,
            )
            classifiers[(arch, train_type)] = run_id
            if plan.light_test:
                light[(arch, train_type)] = evaluate_on_light(run_id, prepare)
    quality = None
    if plan.synthetic_quality and generate:
        # classifier features: the first arch's real classifier, trained above where asked for
        quality = run_synthetic_quality(
            data,
            configs.textual_inversion,
            configs.lora,
            configs.generate,
            replace(configs.classifier, arch=plan.archs[0]),
            configs.quality,
            prepare,
            generate,
            reuse=True,
        )
    return PipelineRuns("", prepare, ti, lora, generate, classifiers, light, quality)


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


def _log_results(scenario: Scenario, seed: int, runs: PipelineRuns) -> None:
    rows = []
    for key, run_id in runs.classifiers.items():
        metrics = mlflow.get_run(run_id).data.metrics
        light_run = runs.light_evaluations.get(key)
        light = mlflow.get_run(light_run).data.metrics if light_run else {}
        arch, train_type = map(str, key)
        rows.append(
            [
                str(scenario),
                seed,
                arch,
                train_type,
                run_id,
                metrics.get("test_accuracy"),
                metrics.get("test_f1_macro"),
                light_run,
                light.get("light_accuracy"),
                light.get("light_f1_macro"),
            ]
        )
        # One metric per classifier on the parent, for the MLflow compare view.
        name = f"{arch}.{train_type.replace('+', '_')}"
        mlflow.log_metric(f"test_f1_macro.{name}", metrics.get("test_f1_macro"))
        if light_run:
            mlflow.log_metric(f"light_f1_macro.{name}", light.get("light_f1_macro"))
    _log_table(pd.DataFrame(rows, columns=RESULT_COLUMNS), RESULTS_FILE)


def _log_table(table: pd.DataFrame, name: str) -> None:
    """Logs `table` as the CSV artifact `name` of the active run."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        table.to_csv(path, index=False)
        mlflow.log_artifact(str(path))
