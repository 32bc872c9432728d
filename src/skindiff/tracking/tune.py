"""The `tune` stage: an Optuna study over the generator's hyperparameters on scenario i.

A trial scores a classifier trained on the trial's synthetic images only, by its macro-F1 on
images of scenario i that neither the generator nor the classifier trained on:
- by default (`exclude_test_of` ii,iii) scenario i's train and validation splits leave out the
  test images of scenarios ii and iii of the same seed, which use the tuned params frozen. Its
  validation split then holds light images only, so the objective is `test_f1_macro`, on
  scenario i's test split (the dark flexible subset; the classifier's epoch is still selected
  on validation). Scenario i's own results with tuned params are then not independent of its
  test split; ii's and iii's are for that seed only (tune each seed with `seeds`, below).
- with `exclude_test_of` empty, the paper's Table 5 protocol: `val_f1_macro`, on scenario i's
  validation split (light and dark images, among them ii's and iii's test images).
The pruner gets the validation macro-F1 after every epoch under either protocol. The worker's
run records the protocol (tag TUNE_PROTOCOL_TAG, param `objective`); a study refuses workers
of another protocol.

Every worker runs the same command against one Optuna RDB storage (SQLite on one machine,
PostgreSQL for several), so workers share the study; each worker is a `tune` MLflow run and
each of its trials a nested run `tune/trial-<n>` holding the trial's stage runs (found or run,
as everywhere else).

A worker records a heartbeat per running trial; a trial whose worker died is failed after the
grace period by the next worker that asks for a trial (or starts), its MLflow runs are marked
FAILED, and it is re-queued with the same params. At the end of a worker the study's best
trial is frozen (`frozen_params.yaml` and tags on the worker's run) and its generator is
registered.

With `seeds` (`tune --seeds 0,42`) one call tunes each data seed on its own: a `tune` run for
the call, and under it one run per seed like a worker's, with the study `<study_name>-seed-<s>`
on scenario i of seed s (every stage seeded with s, that seed's test images of the
exclude_test_of scenarios left out), freezing and registering (version tag `tune_seed`) that
seed's settings. The call's run logs them all as `frozen_params_by_seed.yaml`, so that `main
--frozen-params <call run>` gives each seed the settings that never saw its own test images of
ii and iii; with one tune seed for all, about 46 of the 56 images that scored the default
objective are test images of ii and iii of each other seed."""

import hashlib
import logging
import os
import socket
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import optuna
import sqlalchemy
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException

from skindiff.classify.config import Selection, TrainType
from skindiff.core.settings import as_text
from skindiff.data.config import PrepareConfig, Scenario
from skindiff.errors import SkindiffError, require
from skindiff.options import TUNE, StudyConfigs
from skindiff.plans import TuneConfig
from skindiff.search_space import Dimension, load_search_space
from skindiff.tracking.dry_run import DryRun, plan_group, planning
from skindiff.tracking.frozen import (
    objective_split,
    write_frozen_params,
    write_frozen_params_by_seed,
)
from skindiff.tracking.generate import ensure_generator_chain
from skindiff.tracking.names import (
    BEST_TRIAL_TAG,
    BEST_VALUE_TAG,
    FROZEN_PARAMS_BY_SEED_FILE,
    FROZEN_PARAMS_FILE,
    FROZEN_TAG_PREFIX,
    STORAGE_TAG,
    STUDY_TAG,
    TRIAL_TAG,
    TUNE_PROTOCOL_TAG,
    TUNE_SEEDS_TAG,
    TUNED_TAG,
    Stage,
)
from skindiff.tracking.prepare import ensure_prepare
from skindiff.tracking.registry import log_generator_model, register_generator
from skindiff.tracking.stage import open_stage_run, parent_run_id, run_tree
from skindiff.tracking.train_classifier import check_classifiers, run_train_classifier

logger = logging.getLogger(__name__)

SCENARIO = Scenario.I
PRUNING_METRIC = "val_f1_macro"  # reported after every epoch, whatever the objective
PAPER_PROTOCOL = "paper"
PROTOCOL_ATTR = "protocol"  # study user attr: the protocol its trials were scored by
# Trial user attrs: the trial's MLflow run and the stage runs that make its generator.
TRIAL_RUN_ATTR = "mlflow_run_id"
TI_RUN_ATTR = "ti_run_id"
LORA_RUN_ATTR = "lora_run_id"
GENERATE_RUN_ATTR = "generate_run_id"
CLASSIFIER_RUN_ATTR = "classifier_run_id"
INFEASIBLE_ATTR = "infeasible"  # why the sampled settings cannot run
MAX_RETRY = 2  # a trial whose worker died is re-queued this often
STORAGE_ATTEMPTS = 3  # opening a new storage, see _storage
PRUNER_STARTUP_TRIALS = 3  # trials that complete before the pruner stops any


@dataclass(frozen=True)
class TuneResult:
    """What a worker leaves: its run, the study's best trial and where it is frozen."""

    seed: int  # the data seed the study tuned on
    run_id: str
    objective: str  # the metric best_value is of
    best_trial: int
    best_value: float
    frozen_params: dict[str, str]
    frozen_params_uri: str
    registered_version: str | None  # None when not registered
    champion: bool  # the champion alias moved to registered_version


@dataclass(frozen=True)
class SeedsTuneResult:
    """What a tune call with seeds leaves: its run, each seed's result and where the settings
    of every seed are frozen together."""

    run_id: str
    frozen_params_uri: str  # frozen_params_by_seed.yaml: seed -> {option: value}
    by_seed: dict[int, TuneResult]


def run_tune(configs: StudyConfigs, config: TuneConfig) -> TuneResult:
    """Runs `config.n_trials` trials of the shared study as one worker; returns its result.
    A config with `seeds` is run_tune_seeds's."""
    require(not config.seeds, "tune with seeds: one study per seed, use run_tune_seeds")
    space = load_search_space(config.search_space)
    configs = _tuned_configs(configs)
    objective, protocol = objective_of(configs.data), protocol_of(configs.data)
    _check_classifier(configs)
    seed = sampler_seed(configs.data.seed)
    study = open_study(config, seed)
    _bind_protocol(study, protocol)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # trials of workers that died before this one
    storage = masked_url(config.storage)
    params = {n: v for group, c in configs.groups() for n, v in group.values(c).items()}
    params |= TUNE.values(config) | {
        "storage": storage,
        "sampler_seed": str(seed),
        "objective": objective,
    }
    tags = {
        STUDY_TAG: config.study_name,
        STORAGE_TAG: storage,
        TUNED_TAG: ",".join(d.name for d in space),
        TUNE_PROTOCOL_TAG: protocol,
    }
    with open_stage_run(Stage.TUNE, f"{Stage.TUNE}/{config.study_name}", params, tags) as run:
        study.optimize(lambda trial: _trial(trial, configs, space), n_trials=config.n_trials)
        best = _best_trial(study)
        frozen = {name: as_text(value) for name, value in best.params.items()}
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.log_artifact(str(write_frozen_params(frozen, Path(tmp) / FROZEN_PARAMS_FILE)))
        mlflow.set_tags(
            {FROZEN_TAG_PREFIX + name: value for name, value in frozen.items()}
            | {BEST_VALUE_TAG: str(best.value), BEST_TRIAL_TAG: str(best.number)}
        )
        version, champion = None, False
        if config.registered_model:
            version, champion = _register(study, best, configs, frozen, config.registered_model)
    return TuneResult(
        seed=configs.data.seed,
        run_id=run.info.run_id,
        objective=objective,
        best_trial=best.number,
        best_value=float(best.value),
        frozen_params=frozen,
        frozen_params_uri=f"runs:/{run.info.run_id}/{FROZEN_PARAMS_FILE}",
        registered_version=version,
        champion=champion,
    )


def run_tune_seeds(configs: StudyConfigs, config: TuneConfig) -> SeedsTuneResult:
    """Tunes each of `config.seeds` on its own (see the module docstring): `config.n_trials`
    trials of each seed's study, as one worker of each, in a `tune` run for the call; returns
    each seed's result. `configs`' own seed is not used."""
    require(bool(config.seeds), "run_tune_seeds needs seeds")
    space = load_search_space(config.search_space)  # refused here, before any run
    tuned = _tuned_configs(configs)
    _check_classifier(tuned)
    data = tuned.data
    params = TUNE.values(config) | {
        "storage": masked_url(config.storage),
        "objective": objective_of(data),
    }
    tags = {
        STUDY_TAG: config.study_name,
        STORAGE_TAG: masked_url(config.storage),
        TUNED_TAG: ",".join(d.name for d in space),
        TUNE_PROTOCOL_TAG: protocol_of(data),
        TUNE_SEEDS_TAG: as_text(config.seeds),
    }
    by_seed = {}
    with open_stage_run(Stage.TUNE, f"{Stage.TUNE}/{config.study_name}", params, tags) as run:
        for seed in config.seeds:
            seed_config = replace(config, seeds=(), study_name=seed_study_name(config, seed))
            by_seed[seed] = run_tune(configs.for_pair(SCENARIO, seed), seed_config)
        frozen = {seed: result.frozen_params for seed, result in by_seed.items()}
        with tempfile.TemporaryDirectory() as tmp:
            path = write_frozen_params_by_seed(frozen, Path(tmp) / FROZEN_PARAMS_BY_SEED_FILE)
            mlflow.log_artifact(str(path))
    return SeedsTuneResult(
        run_id=run.info.run_id,
        frozen_params_uri=f"runs:/{run.info.run_id}/{FROZEN_PARAMS_BY_SEED_FILE}",
        by_seed=by_seed,
    )


def plan_tune(configs: StudyConfigs, config: TuneConfig) -> DryRun:
    """What a `tune` call would run (see `dry_run`): per seed's study, its prepare run (found
    or to run) and `n_trials` trials, each costing at most a trial with every tuned range at
    its high end (more steps, more strength: more work). Trials sample their own settings,
    so their stages are planned to run."""
    space = load_search_space(config.search_space)
    tuned = _tuned_configs(configs)
    _check_classifier(tuned)
    costliest = {d.name: as_text(d.kind(d.high)) for d in space if not d.choices}
    with planning() as dry:
        for seed in config.seeds or (configs.data.seed,):
            study = seed_study_name(config, seed) if config.seeds else config.study_name
            seed_configs = tuned.for_pair(SCENARIO, seed) if config.seeds else tuned
            with plan_group(study):
                prepare = ensure_prepare(seed_configs.data)
            trial = seed_configs.with_frozen(costliest, "the search space's high ends")
            with plan_group(f"{study}/trial", repeats=config.n_trials, look_up=False):
                generate = ensure_generator_chain(
                    trial.data, trial.textual_inversion, trial.lora, trial.generate, prepare
                )[2]
                _trial_classifier(trial, prepare, generate)
    dry.notes.append(
        f"each trial's stages at most: {', '.join(f'{k} {v}' for k, v in costliest.items())} "
        "(the tuned ranges' high ends)"
    )
    return dry


def seed_study_name(config: TuneConfig, seed: int) -> str:
    """The study of one data seed of a tune call with seeds."""
    return f"{config.study_name}-seed-{seed}"


def objective_of(data: PrepareConfig) -> str:
    """The metric trials are scored by (see the module docstring): the macro-F1 on
    `objective_split`."""
    return f"{objective_split(data)}_f1_macro"


def _tuned_configs(configs: StudyConfigs) -> StudyConfigs:
    """What a trial runs: scenario i, a classifier on synthetic images only."""
    return replace(
        configs,
        data=replace(configs.data, scenario=SCENARIO),
        classifier=replace(configs.classifier, train_type=TrainType.SYN),
    )


def _check_classifier(configs: StudyConfigs) -> None:
    """Refuses, before any trial, a classifier setting the study cannot be scored with."""
    objective = objective_of(configs.data)
    require(
        configs.classifier.selection != Selection.TEST,
        "selection 'test' would tune the generator on the test split: use --selection val or last",
    )
    require(
        objective != PRUNING_METRIC or configs.data.val_fraction > 0,
        f"the objective is {objective}, but val_fraction is {configs.data.val_fraction}: "
        "set --val-fraction > 0",
    )
    check_classifiers(configs.data, configs.classifier, [configs.classifier.arch])


def protocol_of(data: PrepareConfig) -> str:
    """`paper`, or `exclude-test-of-ii,iii`: how a worker's trials are scored."""
    if not data.exclude_test_of:
        return PAPER_PROTOCOL
    return f"exclude-test-of-{as_text(data.exclude_test_of)}"


def _bind_protocol(study: optuna.Study, protocol: str) -> None:
    """Ties the study to one protocol: workers of two would compare values of two metrics. A
    study with trials but no protocol predates exclude_test_of: the paper's."""
    known = study.user_attrs.get(PROTOCOL_ATTR, PAPER_PROTOCOL if study.trials else None)
    if known is None:
        study.set_user_attr(PROTOCOL_ATTR, protocol)
    elif known != protocol:
        raise SkindiffError(
            f"study {study.study_name} scores trials by protocol {known}, this worker by "
            f"{protocol}: give its exclude_test_of or another study_name"
        )


def open_study(config: TuneConfig, seed: int) -> optuna.Study:
    """The study `config.study_name` in `config.storage`, created by the first worker."""
    return optuna.create_study(
        storage=_storage(config),
        study_name=config.study_name,
        direction="maximize",
        load_if_exists=True,
        # constant_liar: workers running at once see each other's trials as poor, and spread.
        sampler=optuna.samplers.TPESampler(seed=seed, constant_liar=True),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS),
    )


def _storage(config: TuneConfig) -> optuna.storages.RDBStorage:
    url = config.storage
    masked = masked_url(url)  # also refuses what is not a URL
    # SQLite locks the whole file per write: wait for the other workers instead of failing.
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=config.heartbeat_interval,
                    grace_period=config.grace_period,
                    heartbeat_stale_trial_callback=fail_and_retry,
                )
        except sqlalchemy.exc.SQLAlchemyError as err:
            # Workers started together on a new storage race to create its tables: the
            # losers find them made when they try again.
            if attempt + 1 == STORAGE_ATTEMPTS:
                reason = str(err).splitlines()[0]
                raise SkindiffError(f"storage {masked!r}: {reason}") from None
            time.sleep(1)
        except ImportError as err:
            raise SkindiffError(f"storage {masked!r}: {err}") from None


def sampler_seed(seed: int) -> int:
    """The sampler seed of this worker: from `seed`, but different for workers started
    together (on one seed they would all propose the same first points)."""
    text = f"{seed}/{socket.gethostname()}/{os.getpid()}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


def masked_url(url: str) -> str:
    """A storage URL without its password, for params, tags and messages."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        raise SkindiffError(
            f"storage must be an RDB URL such as {TuneConfig.storage}, got {url!r}"
        ) from None


def _trial(trial: optuna.Trial, configs: StudyConfigs, space: list[Dimension]) -> float:
    """One trial as a nested run: its stages found or run, the classifier's validation
    macro-F1 reported per epoch (the pruner may stop it), its objective returned."""
    values = {dimension.name: as_text(dimension.suggest(trial)) for dimension in space}
    try:
        configs = configs.with_frozen(values, f"trial {trial.number}")
    except SkindiffError as err:
        # A combination the stages refuse (strength x steps below one denoising step, ...):
        # NaN fails this trial, and the study goes on.
        logger.warning("trial %d is infeasible: %s", trial.number, err)
        trial.set_user_attr(INFEASIBLE_ATTR, str(err))
        return float("nan")
    with open_stage_run(
        Stage.TUNE,
        f"{Stage.TUNE}/trial-{trial.number}",
        values,
        {STUDY_TAG: trial.study.study_name, TRIAL_TAG: str(trial.number)},
    ) as run:
        trial.set_user_attr(TRIAL_RUN_ATTR, run.info.run_id)
        try:
            value = _objective(trial, configs)
        except optuna.TrialPruned:
            mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
            raise
        mlflow.log_metric(objective_of(configs.data), value)
    return value


def _objective(trial: optuna.Trial, configs: StudyConfigs) -> float:
    data = configs.data
    prepare = ensure_prepare(data)
    ti, lora, generate = ensure_generator_chain(
        data, configs.textual_inversion, configs.lora, configs.generate, prepare
    )
    for attr, run_id in ((TI_RUN_ATTR, ti), (LORA_RUN_ATTR, lora), (GENERATE_RUN_ATTR, generate)):
        trial.set_user_attr(attr, run_id)

    def report(epoch: int, val_f1_macro: float) -> None:
        trial.report(val_f1_macro, epoch)
        if trial.should_prune():
            # The classifier's run (the active one) was stopped, not broken.
            mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
            raise optuna.TrialPruned(f"{PRUNING_METRIC} {val_f1_macro:.4f} at epoch {epoch}")

    classifier = _trial_classifier(configs, prepare, generate, report)
    trial.set_user_attr(CLASSIFIER_RUN_ATTR, classifier)
    return mlflow.get_run(classifier).data.metrics[objective_of(data)]


def _trial_classifier(
    configs: StudyConfigs,
    prepare: str,
    generate: str,
    on_epoch: Callable[[int, float], None] | None = None,
) -> str:
    """A trial's classifier run (synthetic images only, see `_tuned_configs`), found or
    trained; `on_epoch` gets each epoch's validation macro-F1."""
    return run_train_classifier(
        configs.data,
        configs.classifier,
        configs.textual_inversion,
        configs.lora,
        configs.generate,
        prepare,
        generate,
        on_epoch=on_epoch,
        reuse=True,
    )


def fail_and_retry(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Heartbeat-stale trial (Optuna has just failed it): its worker is gone, so its MLflow
    runs still RUNNING (the trial run, the stage runs under it, the worker's tune run and, for
    a call with seeds, the call's run) are marked FAILED; then the trial is queued again with
    the same params."""
    run_id = trial.user_attrs.get(TRIAL_RUN_ATTR)
    if run_id:
        client = mlflow.MlflowClient()
        try:
            trial_run = client.get_run(run_id)
            dead = run_tree(trial_run)
            above = parent_run_id(trial_run)
            while above:
                dead.append(client.get_run(above))
                above = parent_run_id(dead[-1])
            for run in dead:
                if run.info.status == "RUNNING":
                    client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
        except MlflowException as err:
            logger.warning("trial %d: its MLflow runs not marked FAILED: %s", trial.number, err)
    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, trial)


def _best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    try:
        return study.best_trial
    except ValueError:
        raise SkindiffError(f"study {study.study_name} has no completed trial yet") from None


def _register(
    study: optuna.Study,
    best: optuna.trial.FrozenTrial,
    configs: StudyConfigs,
    frozen: dict[str, str],
    registered_model: str,
) -> tuple[str | None, bool]:
    """Registers the best trial's generator, once per (study, model): a worker that ends
    with the best trial another worker registered only reports that version."""
    done = study.user_attrs.get(f"registered.{registered_model}", {})
    if done.get("trial") == best.number:
        return done["version"], False
    if GENERATE_RUN_ATTR not in best.user_attrs:
        logger.warning("best trial %d has no generator runs: not registered", best.number)
        return None, False
    generate = configs.with_frozen(frozen, f"trial {best.number}").generate
    model_uri = log_generator_model(
        best.user_attrs[TI_RUN_ATTR], best.user_attrs[LORA_RUN_ATTR], generate, frozen
    )
    version, champion = register_generator(
        model_uri,
        registered_model,
        SCENARIO,
        objective_of(configs.data),
        best.value,
        tune_seed=configs.data.seed,
    )
    study.set_user_attr(
        f"registered.{registered_model}", {"trial": best.number, "version": version}
    )
    return version, champion
