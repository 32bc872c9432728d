"""The `report` stage: reads an experiment's finished runs, writes and logs the paper's tables.

Runs are grouped by their study settings (every param of the `main` or `ablation` call but
what it covers, its seeds and scenarios, and run ids; frozen values in place of the command
line's), so runs made with different settings never share a table. Within a group, scores come
from the newest FINISHED `main` pair run per (scenario, seed) (its `results.csv` names its
classifier runs) and, per seed, from the newest FINISHED `ablation` run that has it.
"""

import logging
import re
import tempfile
from collections.abc import Callable
from dataclasses import replace
from functools import cache
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import Experiment, Run

from skindiff.core.labels import slug
from skindiff.core.settings import coerce
from skindiff.data.config import CohortSpec
from skindiff.errors import SkindiffError
from skindiff.options import REPORT
from skindiff.plans import ReportConfig
from skindiff.quality.score import ALL as ALL_CONDITIONS
from skindiff.report import (
    METRICS,
    NEAR_DUPLICATE_COLUMNS,
    PAIRED_COLUMNS,
    PAIRED_FILE,
    QUALITY_COLUMNS,
    SKIN_TONE_COLUMNS,
    TUNING_OVERLAP_COLUMNS,
    RunPredictions,
    SettingsGroup,
    paired_runs,
    previous_report_files,
    settings_digest,
    write_report,
)
from skindiff.tracking.ablation import COLUMNS as ABLATION_COLUMNS
from skindiff.tracking.names import (
    ABLATION_FILE,
    CLASSIFIER_MODEL,
    FROZEN_PARAM_PREFIX,
    FROZEN_PARAMS_SEED_PARAM,
    FROZEN_PARAMS_TAG,
    MEMORIZATION_SPACE_PARAM,
    NEAR_DUPLICATES_TAG,
    PAIRED_METRIC_PREFIX,
    PREDICTIONS_DIR,
    QUALITY_METRICS,
    QUALITY_PER_IMAGE,
    QUALITY_RUN_TAG,
    REPORT_EXPERIMENT_TAG,
    RESULTS_FILE,
    SCENARIO_TAG,
    SCORED_BY_TUNING_METRIC,
    SHARD_RESOLVED_PARAM,
    SYNTHETIC_DIR,
    SYNTHETIC_GRID,
    TEST_PREDICTIONS,
    TUNE_PROTOCOL_TAG,
    Stage,
)
from skindiff.tracking.stage import finished_runs, open_stage_run, parent_run_id, upstream_run_id

log = logging.getLogger(__name__)

# Report column <- the classifier run's test metric (fractions).
TEST_METRICS = {
    "accuracy": "test_accuracy",
    "precision": "test_precision_macro",
    "recall": "test_recall_macro",
    "f1": "test_f1_macro",
}
CLASSIFIER_COLUMNS = [
    "scenario",
    "seed",
    "arch",
    "train_type",
    *METRICS,
    "train_size",  # images the classifier trained on, real and synthetic
    "n_test",
    "n_test_per_class",  # when every class has as many test images, else NaN
    "run_id",
    "main_run_id",
    "settings",
]
# Params that say what a call covers, not how it runs: not settings. So the pairs of the
# workers of one study (each its own `main` call with its own shard) share one group.
PLAN_PARAMS = (
    "scenario",
    "scenarios",
    "seed",
    "seeds",
    "archs",
    "train_types",
    "frozen_params",
    "frozen_fallback_seed",  # what it chose is in the frozen.<name> and frozen_params_seed params
    "shard",
    SHARD_RESOLVED_PARAM,
    "light_test",  # adds evaluate runs beside the classifiers; their scores are the same
    "synthetic_quality",  # adds a synthetic_quality run per pair
)
# Scenario whose grid stands for the paper's Fig. 2 in a group, in order of preference.
FIGURE_2_SCENARIOS = ("i", "ii", "iii")


def resolve_experiment(experiment: str | None) -> Experiment:
    """The experiment named `experiment`, or with that id; empty: the one the report run goes
    to (the command's experiment_name, or the run `mlflow run` opened)."""
    if not experiment:
        # MLflow's own choice for the next run: what `use_experiment` set, or the environment's.
        return mlflow.get_experiment(mlflow.tracking.fluent._get_experiment_id())
    found = mlflow.get_experiment_by_name(experiment)
    if found is None and experiment.isdigit():
        try:
            found = mlflow.get_experiment(experiment)
        except mlflow.exceptions.MlflowException:
            found = None
    if found is None:
        raise SkindiffError(
            f"experiment {experiment!r} not found (by name or id) on {mlflow.get_tracking_uri()}"
        )
    return found


def study_settings(params: dict[str, str]) -> dict[str, str]:
    """The settings of a `main` or `ablation` call from its params: all but the PLAN_PARAMS and
    run ids, the frozen values it used (`frozen.<name>`) in place of the command line's."""
    settings = {
        name: value
        for name, value in params.items()
        if name not in PLAN_PARAMS
        and not name.endswith("_run_id")
        and not name.startswith(FROZEN_PARAM_PREFIX)
    }
    for name, value in params.items():
        if name.startswith(FROZEN_PARAM_PREFIX):
            settings[name.removeprefix(FROZEN_PARAM_PREFIX)] = value
    return settings


@cache
def _run(run_id: str) -> Run:
    return mlflow.get_run(run_id)


def _artifact(run_id: str, path: str, read: Callable[[Path], object]) -> object | None:
    """`read(local file)` of a run's artifact, or None (with a warning) where it has none."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=path, dst_path=tmp
            )
        except (mlflow.exceptions.MlflowException, OSError):
            log.warning("run %s has no %s: skipped", run_id, path)
            return None
        return read(Path(local))


def _table(run_id: str, path: str) -> pd.DataFrame | None:
    return _artifact(run_id, path, lambda local: pd.read_csv(local, keep_default_na=False))


def _main_call(pair: Run) -> Run | None:
    """The `main` run a pair run belongs to (None for a pair without one)."""
    parent = parent_run_id(pair)
    return _run(parent) if parent else None


def _tuning(pair: Run) -> tuple[str | None, str | None]:
    """(where the pair's frozen params came from, the protocol of that tune run where the
    source is one), or (None, None) for settings not frozen from a tune."""
    call = _main_call(pair)
    source = call.data.tags.get(FROZEN_PARAMS_TAG) if call else None
    if not source:
        return None, None
    protocol = call.data.tags.get(TUNE_PROTOCOL_TAG)
    if protocol is None:  # a main run older than that tag: the source's, where it is a run
        try:
            protocol = _run(source).data.tags.get(TUNE_PROTOCOL_TAG)
        except mlflow.exceptions.MlflowException:  # a YAML file or a model URI, not a run id
            protocol = None
    return source, protocol


def _tuning_overlap(scores: pd.DataFrame) -> pd.DataFrame:
    """Per pair run of `scores` (TUNING_OVERLAP_COLUMNS): the seed its frozen settings were
    tuned on and how many of its test images scored the tuning objective, as the pair run
    recorded them (NaN where it did not: a YAML source, or older runs)."""
    rows = []
    for pair_id, classifiers in scores.groupby("main_run_id", sort=False):
        pair = _run(pair_id)
        first = classifiers.iloc[0]
        rows.append(
            [
                first["scenario"],
                int(first["seed"]),
                pair.data.params.get(FROZEN_PARAMS_SEED_PARAM, "unknown"),
                first["n_test"],
                pair.data.metrics.get(SCORED_BY_TUNING_METRIC, float("nan")),
            ]
        )
    return pd.DataFrame(rows, columns=TUNING_OVERLAP_COLUMNS)


def _test_sizes(classifier: Run) -> tuple[float, float]:
    """(test images, test images per class where every class has as many, else NaN) from the
    prepare run the classifier was trained from (NaN, NaN without one)."""
    prepare = upstream_run_id(classifier, Stage.PREPARE)
    if not prepare:
        return float("nan"), float("nan")
    metrics = _run(prepare).data.metrics
    per_class = {
        metrics.get(f"n_test_{slug(label)}")
        for label in classifier.data.params.get("conditions", "").split(",")
        if label
    }
    balanced = len(per_class) == 1 and None not in per_class
    return metrics.get("n_test", float("nan")), per_class.pop() if balanced else float("nan")


def _classifier_row(result, main_run_id: str, digest: str) -> list:
    classifier = _run(result.run_id)
    metrics = classifier.data.metrics
    missing = [name for name in TEST_METRICS.values() if name not in metrics]
    if missing:
        raise SkindiffError(
            f"classifier run {result.run_id} (in {RESULTS_FILE} of main run {main_run_id}) "
            f"has no metric {', '.join(missing)}"
        )
    sizes = [metrics.get(f"n_train_{source}") for source in ("real", "synthetic")]
    train_size = sum(sizes) if None not in sizes else float("nan")
    key = [result.scenario, int(result.seed), result.arch, result.train_type]
    scores = [metrics[name] for name in TEST_METRICS.values()]
    return [*key, *scores, train_size, *_test_sizes(classifier), result.run_id, main_run_id, digest]


def _figure_2(rows: pd.DataFrame, folder: Path) -> Path | None:
    """The real/synthetic grid of a generate run behind the group's synthetic classifiers
    (scenario i first, lowest seed), copied into `folder`; None without one."""
    synthetic = rows[rows["train_type"] != "real"]
    for scenario in FIGURE_2_SCENARIOS:
        for run_id in synthetic[synthetic["scenario"] == scenario].sort_values("seed")["run_id"]:
            generate = upstream_run_id(_run(run_id), Stage.GENERATE)
            if generate:
                grid = f"{SYNTHETIC_DIR}/{SYNTHETIC_GRID}"
                target = folder / f"figure2_{generate}.png"
                if _artifact(generate, grid, lambda local, t=target: local.replace(t)) is None:
                    continue
                return target
    return None


SKIN_TONE_METRICS = {  # report column <- (stage, metric)
    "real_dark_test_ita": (Stage.PREPARE, "ita_median_test_dark"),
    "source_light_ita": (Stage.GENERATE, "ita_median_source_light"),
    "synthetic_ita": (Stage.GENERATE, "ita_median_synthetic"),
    "on_target": (Stage.GENERATE, "on_target_fraction"),
    "kept": (Stage.GENERATE, "kept_fraction"),
}


def _skin_tones(scores: pd.DataFrame) -> pd.DataFrame:
    """Per (scenario, seed): the skin tone metrics of the generate run behind the group's
    synthetic classifiers and of its prepare run, and whether it filtered (SKIN_TONE_COLUMNS)."""
    rows = []
    synthetic = scores[scores["train_type"] != "real"]
    for (scenario, seed), runs in synthetic.groupby(["scenario", "seed"]):
        generate_id = upstream_run_id(_run(runs["run_id"].iloc[0]), Stage.GENERATE)
        if not generate_id:
            continue
        generate = _run(generate_id)
        prepare_id = upstream_run_id(generate, Stage.PREPARE)
        metrics = {
            Stage.GENERATE: generate.data.metrics,
            Stage.PREPARE: _run(prepare_id).data.metrics if prepare_id else {},
        }
        values = [
            metrics[stage].get(name, float("nan")) for stage, name in SKIN_TONE_METRICS.values()
        ]
        filtered = generate.data.params.get("skin_tone_filter", "false").lower() == "true"
        rows.append([scenario, seed, *values, filtered, generate_id])
    return pd.DataFrame(rows, columns=SKIN_TONE_COLUMNS)


def _near_duplicates(scores: pd.DataFrame) -> pd.DataFrame:
    """Per (scenario, seed): what the prepare run behind its classifiers found of
    near-duplicates (NEAR_DUPLICATE_COLUMNS)."""
    rows = []
    for (scenario, seed), runs in scores.groupby(["scenario", "seed"]):
        prepare_id = upstream_run_id(_run(runs["run_id"].iloc[0]), Stage.PREPARE)
        if not prepare_id:
            continue
        prepare = _run(prepare_id)
        mode = prepare.data.tags.get(NEAR_DUPLICATES_TAG, "")
        metrics = prepare.data.metrics | (
            {"n_near_duplicates_dropped": 0.0} if mode == "report" else {}
        )
        counts = [metrics.get(name, float("nan")) for name in NEAR_DUPLICATE_COLUMNS[3:-1]]
        rows.append([scenario, seed, mode, *counts, prepare_id])
    return pd.DataFrame(rows, columns=NEAR_DUPLICATE_COLUMNS)


def _quality(scores: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, float | None]:
    """(rows of QUALITY_COLUMNS, the synthetic images' nearest training similarities, the
    memorization threshold) of the synthetic_quality runs the group's pair runs name."""
    rows, similarities, thresholds = [], [], set()
    for pair_id, classifiers in scores.groupby("main_run_id", sort=False):
        quality_id = _run(pair_id).data.tags.get(QUALITY_RUN_TAG)
        table = _table(quality_id, QUALITY_METRICS) if quality_id else None
        if table is None:
            continue
        scenario, seed = classifiers["scenario"].iloc[0], int(classifiers["seed"].iloc[0])
        quality = _run(quality_id)
        features = quality.data.params.get("quality_features", "")
        thresholds.add(float(quality.data.params.get("memorization_threshold", "nan")))
        space = quality.data.params.get(MEMORIZATION_SPACE_PARAM, features)
        memorized = quality.data.metrics.get(f"memorized_share_{space}", float("nan"))
        for row in table[table["condition"] == ALL_CONDITIONS].itertuples():
            share = memorized if row.set == "synthetic" else float("nan")
            measures = [row.fd, row.kid, row.precision, row.recall, row.density, row.coverage]
            rows.append([scenario, seed, features, row.set, row.n_images, *measures, share])
            rows[-1].append(quality_id)
        per_image = _table(quality_id, QUALITY_PER_IMAGE)
        if per_image is not None:
            similarities.append(
                per_image[["nearest_similarity"]].assign(scenario=scenario, seed=seed)
            )
    found = pd.concat(similarities, ignore_index=True) if similarities else None
    threshold = thresholds.pop() if len(thresholds) == 1 else None
    return pd.DataFrame(rows, columns=QUALITY_COLUMNS), found, threshold


def classifier_groups(experiment_id: str) -> dict[str, tuple[dict[str, str], pd.DataFrame]]:
    """Per settings digest: the settings, and the test scores (fractions) of the classifier
    runs that the group's newest FINISHED main pair run of each (scenario, seed) lists in its
    results.csv (column `main_run_id`: the pair run)."""
    newest: dict[tuple, Run] = {}
    settings_of: dict[str, dict[str, str]] = {}
    for run in finished_runs(experiment_id, Stage.MAIN):
        scenario = run.data.tags.get(SCENARIO_TAG)
        if scenario:  # the pair runs, not the parent of a whole `main` call
            call = _main_call(run)
            settings = study_settings(call.data.params) if call else {}
            digest = settings_digest(settings)
            settings_of[digest] = settings
            newest.setdefault((digest, scenario, run.data.params.get("seed")), run)
    rows = []
    for (digest, _, _), pair in newest.items():
        results = _table(pair.info.run_id, RESULTS_FILE)
        for result in [] if results is None else results.itertuples():
            rows.append(_classifier_row(result, pair.info.run_id, digest))
    scores = pd.DataFrame(rows, columns=CLASSIFIER_COLUMNS)
    return {
        digest: (settings_of[digest], scores[scores["settings"] == digest])
        for digest in dict.fromkeys(scores["settings"])
    }


def ablation_groups(experiment_id: str) -> dict[str, tuple[dict[str, str], pd.DataFrame]]:
    """Per settings digest: the settings, and the rows of ablation.csv, per seed from the
    group's newest FINISHED ablation run that has it."""
    tables: dict[str, list[pd.DataFrame]] = {}
    settings_of, seen = {}, {}
    for run in finished_runs(experiment_id, Stage.ABLATION):
        table = _table(run.info.run_id, ABLATION_FILE)
        if table is None:
            continue
        settings = study_settings(run.data.params)
        digest = settings_digest(settings)
        settings_of[digest] = settings
        done = seen.setdefault(digest, set())
        table = table[~table["seed"].isin(done)]
        done |= set(table["seed"])
        tables.setdefault(digest, []).append(table.assign(ablation_run_id=run.info.run_id))
    return {
        digest: (settings_of[digest], pd.concat(parts).reset_index(drop=True))
        for digest, parts in tables.items()
    }


def _groups(experiment_id: str, folder: Path) -> list[SettingsGroup]:
    """The experiment's runs by settings: a group may hold main and ablation runs."""
    classifiers = classifier_groups(experiment_id)
    ablations = ablation_groups(experiment_id)
    evaluations = _evaluations(experiment_id)
    no_scores = pd.DataFrame(columns=CLASSIFIER_COLUMNS)
    no_rows = pd.DataFrame(columns=[*ABLATION_COLUMNS, "ablation_run_id"])
    groups = []
    for digest in dict.fromkeys([*classifiers, *ablations]):
        settings, scores = classifiers.get(digest, ({}, no_scores))
        settings, rows = ablations.get(digest, (settings, no_rows))
        newest_pair = scores["main_run_id"].iloc[0] if len(scores) else None
        tuning = _tuning(_run(newest_pair)) if newest_pair else (None, None)
        overlap = _tuning_overlap(scores) if tuning[0] else None
        figure = _figure_2(scores, folder)
        tones = _skin_tones(scores) if len(scores) else pd.DataFrame(columns=SKIN_TONE_COLUMNS)
        group = SettingsGroup(digest, settings, scores, rows, figure, *tuning, tones, overlap)
        if len(scores):
            group = replace(group, near_duplicates=_near_duplicates(scores))
            quality, similarities, threshold = _quality(scores)
            group = replace(
                group,
                quality=quality,
                nearest_similarities=similarities if threshold is not None else None,
                memorization_threshold=threshold,
            )
        pairs = paired_runs(group)
        compared = dict.fromkeys([*pairs["baseline_run_id"], *pairs["candidate_run_id"]])
        groups.append(
            replace(
                group,
                predictions={run: _predictions(run) for run in compared},
                light_predictions={run: _light_predictions(run, evaluations) for run in compared},
            )
        )
    return groups


def _evaluations(experiment_id: str) -> dict[str, list[Run]]:
    """Per classifier run id: the FINISHED evaluate runs of its model (`runs:/<id>/model`) in
    the experiment, newest first."""
    found: dict[str, list[Run]] = {}
    for run in finished_runs(experiment_id, Stage.EVALUATE):
        model = re.fullmatch(
            rf"runs:/(\w+)/{CLASSIFIER_MODEL}", run.data.params.get("model_uri", "")
        )
        if model:
            found.setdefault(model[1], []).append(run)
    return found


def _labels(run_id: str) -> tuple[str, ...] | None:
    """The label set a classifier run was scored on (its cohort's labels, as the classifier's
    classes), None where the run is gone or has no conditions param."""
    try:
        conditions = _run(run_id).data.params.get("conditions")
    except mlflow.exceptions.MlflowException:
        log.warning("classifier run %s not found: its predictions are missing", run_id)
        return None
    if not conditions:
        return None
    return CohortSpec(coerce(tuple[str, ...], "conditions", conditions)).labels


def _light_predictions(run_id: str, evaluations: dict[str, list[Run]]) -> RunPredictions | None:
    """A classifier's predictions on light-skinned images: the light rows of its newest
    evaluate run that has any; None where none has."""
    labels = _labels(run_id)
    for evaluation in evaluations.get(run_id, []) if labels else []:
        name = evaluation.data.params.get("name", "test")
        frame = _table(evaluation.info.run_id, f"{PREDICTIONS_DIR}/{name}.csv")
        if frame is not None and "group" in frame:
            light = frame[frame["group"] == "light"]
            if len(light) >= 2:  # what the bootstrap can resample
                return RunPredictions(labels, light[["md5hash", "label", "predicted"]])
    return None


@cache
def _predictions(run_id: str) -> RunPredictions | None:
    """A classifier run's test predictions and the label set it was scored on, or None where
    it has either not."""
    labels = _labels(run_id)
    frame = _table(run_id, TEST_PREDICTIONS) if labels else None
    if frame is None:
        return None
    return RunPredictions(labels, frame[["md5hash", "label", "predicted"]])


def paired_metrics(table_file: Path, with_group: bool) -> dict[str, float]:
    """Each row of a paired_differences CSV as metrics mean_diff, ci_low and ci_high, named so
    the UI groups them: `paired.[<group>.]<scenario>.<arch>.<comparison>.<metric>.<value>`, in
    slugs (MLflow names cannot hold `+`)."""
    text = PAIRED_COLUMNS[:5]  # group ... metric: as written, a digest of digits too
    table = pd.read_csv(table_file, dtype=dict.fromkeys(text, str), keep_default_na=False)
    metrics = {}
    for row in table.itertuples():
        parts = [row.group] if with_group else []
        parts += [slug(row.scenario), slug(row.arch) or "unknown", slug(row.comparison), row.metric]
        for value in ("mean_diff", "ci_low", "ci_high"):
            metrics[".".join([PAIRED_METRIC_PREFIX, *parts, value])] = float(getattr(row, value))
    return metrics


def run_report(config: ReportConfig) -> str:
    """Writes the report of `config.experiment` to `config.output_dir` and logs it as the
    artifacts of a `report` run (in the current experiment); returns the run id."""
    found = resolve_experiment(config.experiment)
    folder = Path(config.output_dir)
    previous_report_files(folder)  # refuse a user's folder before any work
    _run.cache_clear()
    _predictions.cache_clear()
    with tempfile.TemporaryDirectory() as tmp:
        groups = _groups(found.experiment_id, Path(tmp))
        if not groups:
            raise SkindiffError(
                f"experiment {found.name!r} has no FINISHED main pair runs with {RESULTS_FILE} "
                f"and no FINISHED ablation runs: nothing to report"
            )
        n_pairs = sum(g.classifier_scores["main_run_id"].nunique() for g in groups)
        n_ablation = sum(g.ablation_scores["ablation_run_id"].nunique() for g in groups)
        n_classifiers = sum(len(g.classifier_scores) for g in groups)
        source = (
            f"Experiment `{found.name}` (id {found.experiment_id}) on "
            f"{mlflow.get_tracking_uri()}: {n_pairs} main pair runs ({n_classifiers} classifier "
            f"runs), {n_ablation} ablation runs, in {len(groups)} group(s) of settings."
        )
        tags = {REPORT_EXPERIMENT_TAG: found.experiment_id}
        replicates, confidence = config.bootstrap_replicates, config.confidence
        with open_stage_run(Stage.REPORT, str(Stage.REPORT), REPORT.values(config), tags) as run:
            for path in write_report(groups, folder, source, replicates, confidence):
                mlflow.log_artifact(str(path))
                if path.name.startswith(PAIRED_FILE) and path.suffix == ".csv":
                    mlflow.log_metrics(paired_metrics(path, with_group=len(groups) > 1))
    return run.info.run_id
