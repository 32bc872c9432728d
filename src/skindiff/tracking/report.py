"""The `report` stage: reads an experiment's finished runs, writes and logs the paper's tables.

Scores come from the newest FINISHED `main` pair run per (scenario, seed) (its `results.csv`
names its classifier runs) and from the newest FINISHED `ablation` run covering each seed.
"""

import logging
import os
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import Experiment

from skindiff.errors import SkindiffError
from skindiff.options import REPORT
from skindiff.report import METRICS, previous_report_files, write_report
from skindiff.tracking.ablation import COLUMNS as ABLATION_COLUMNS
from skindiff.tracking.names import (
    ABLATION_FILE,
    ENTRY_POINT_TAG,
    REPORT_EXPERIMENT_TAG,
    RESULTS_FILE,
    SCENARIO_TAG,
    Stage,
)
from skindiff.tracking.settings import ReportConfig
from skindiff.tracking.stage import open_stage_run

log = logging.getLogger(__name__)

# Report column <- the classifier run's test metric (fractions).
TEST_METRICS = {
    "accuracy": "test_accuracy",
    "precision": "test_precision_macro",
    "recall": "test_recall_macro",
    "f1": "test_f1_macro",
}
CLASSIFIER_COLUMNS = ["scenario", "seed", "arch", "train_type", *METRICS, "run_id", "main_run_id"]


def resolve_experiment(experiment: str | None) -> Experiment:
    """The experiment named `experiment`, or with that id; empty: the current one
    (MLFLOW_EXPERIMENT_ID, MLFLOW_EXPERIMENT_NAME, else Default)."""
    if not experiment:
        by_id = os.environ.get("MLFLOW_EXPERIMENT_ID", "")
        experiment = by_id or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "Default"
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


def _finished_runs(experiment_id: str, stage: Stage) -> list:
    """FINISHED runs of `stage`, newest first."""
    return mlflow.search_runs(
        [experiment_id],
        filter_string=f"tags.`{ENTRY_POINT_TAG}` = '{stage}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )


def _artifact_table(run_id: str, path: str) -> pd.DataFrame | None:
    """A CSV artifact of a run, or None (with a warning) where the run has none."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=path, dst_path=tmp
            )
        except (mlflow.exceptions.MlflowException, OSError):
            log.warning("run %s has no %s: skipped", run_id, path)
            return None
        return pd.read_csv(local, keep_default_na=False)


def classifier_scores(experiment_id: str) -> pd.DataFrame:
    """Test scores (fractions) of the classifier runs that the newest FINISHED main pair run of
    each (scenario, seed) lists in its results.csv."""
    newest = {}
    for run in _finished_runs(experiment_id, Stage.MAIN):
        scenario = run.data.tags.get(SCENARIO_TAG)
        if scenario:  # the pair runs, not the parent of a whole `main` call
            newest.setdefault((scenario, run.data.params.get("seed")), run.info.run_id)
    rows = []
    for main_run_id in newest.values():
        results = _artifact_table(main_run_id, RESULTS_FILE)
        for result in [] if results is None else results.itertuples():
            metrics = mlflow.get_run(result.run_id).data.metrics
            missing = [name for name in TEST_METRICS.values() if name not in metrics]
            if missing:
                raise SkindiffError(
                    f"classifier run {result.run_id} (in {RESULTS_FILE} of main run "
                    f"{main_run_id}) has no metric {', '.join(missing)}"
                )
            scores = [metrics[name] for name in TEST_METRICS.values()]
            key = [result.scenario, int(result.seed), result.arch, result.train_type]
            rows.append([*key, *scores, result.run_id, main_run_id])
    return pd.DataFrame(rows, columns=CLASSIFIER_COLUMNS)


def ablation_scores(experiment_id: str) -> pd.DataFrame:
    """The rows of ablation.csv, per seed from the newest FINISHED ablation run that has it."""
    tables, seen = [], set()
    for run in _finished_runs(experiment_id, Stage.ABLATION):
        table = _artifact_table(run.info.run_id, ABLATION_FILE)
        if table is None:
            continue
        table = table[~table["seed"].isin(seen)]
        seen |= set(table["seed"])
        tables.append(table.assign(ablation_run_id=run.info.run_id))
    empty = pd.DataFrame(columns=[*ABLATION_COLUMNS, "ablation_run_id"])
    return pd.concat(tables) if tables else empty


def run_report(config: ReportConfig) -> str:
    """Writes the report of `config.experiment` to `config.output_dir` and logs it as the
    artifacts of a `report` run (in the current experiment); returns the run id."""
    found = resolve_experiment(config.experiment)
    folder = Path(config.output_dir)
    previous_report_files(folder)  # refuse a user's folder before any work
    classifiers = classifier_scores(found.experiment_id)
    ablation = ablation_scores(found.experiment_id)
    if classifiers.empty and ablation.empty:
        raise SkindiffError(
            f"experiment {found.name!r} has no FINISHED main pair runs with {RESULTS_FILE} "
            f"and no FINISHED ablation runs: nothing to report"
        )
    source = (
        f"Experiment `{found.name}` (id {found.experiment_id}) on {mlflow.get_tracking_uri()}: "
        f"{classifiers['main_run_id'].nunique()} main pair runs ({len(classifiers)} classifier "
        f"runs), {ablation['ablation_run_id'].nunique()} ablation runs."
    )
    tags = {REPORT_EXPERIMENT_TAG: found.experiment_id}
    with open_stage_run(Stage.REPORT, str(Stage.REPORT), REPORT.values(config), tags) as run:
        for path in write_report(classifiers, ablation, folder, source):
            mlflow.log_artifact(str(path))
    return run.info.run_id
