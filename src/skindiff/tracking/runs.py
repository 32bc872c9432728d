"""Every stage is an MLflow run tagged with its entry point, however it was started."""

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.entities import Metric

from skindiff import __version__
from skindiff.errors import SkindiffError

ENTRY_POINT_TAG = "mlflow.project.entryPoint"
VERSION_TAG = "skindiff.version"


@contextmanager
def stage_run(
    stage: str, run_name: str, params: Mapping[str, str] | None = None
) -> Iterator[mlflow.ActiveRun]:
    """Opens the run of one stage: the `mlflow run` run when there is one, else a new run,
    nested under the active run when called from the pipeline. The run is marked FAILED
    if the stage raises.

    `mlflow run` has already logged the entry point's parameters (as it quoted them for the
    shell); MLflow forbids changing a param, so only the others are added."""
    with mlflow.start_run(
        run_name=run_name,
        nested=mlflow.active_run() is not None,
        tags={ENTRY_POINT_TAG: stage, VERSION_TAG: __version__},
    ) as run:
        logged = mlflow.get_run(run.info.run_id).data.params
        missing = {key: value for key, value in (params or {}).items() if key not in logged}
        if missing:
            mlflow.log_params(missing)
        yield run


def require_stage_run(run_id: str, stage: str) -> mlflow.entities.Run:
    """The FINISHED run `run_id` of `stage`, or a clear error saying what it is instead."""
    try:
        run = mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise SkindiffError(
            f"{stage} run {run_id!r} not found on {mlflow.get_tracking_uri()}"
        ) from None
    found = run.data.tags.get(ENTRY_POINT_TAG)
    if found != stage:
        raise SkindiffError(f"run {run_id} is a {found or 'untagged'} run, not a {stage} run")
    if run.info.status != "FINISHED":
        raise SkindiffError(f"{stage} run {run_id} is {run.info.status}, not FINISHED")
    return run


def check_same_base_model(run_id: str, base_model: str) -> None:
    """Refuses an upstream run trained on another base model (its tensors would not fit)."""
    used = mlflow.get_run(run_id).data.params.get("base_model", "").strip("'")
    if used and used != base_model:
        raise SkindiffError(f"run {run_id} used base_model {used!r}, this stage {base_model!r}")


def fetch_upstream(run_id: str, stage: str, artifact_path: str, base_model: str, dst: Path) -> Path:
    """An artifact of a finished upstream `stage` run made with the same base model."""
    require_stage_run(run_id, stage)
    check_same_base_model(run_id, base_model)
    return download_run_dir(run_id, artifact_path, dst)


def download_run_dir(run_id: str, artifact_path: str, dst: Path) -> Path:
    """Downloads a run's artifact folder (or file) into `dst` and returns its local path."""
    return Path(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact_path, dst_path=str(dst)
        )
    )


def log_curve(name: str, values: Sequence[float]) -> None:
    """A per-step curve (e.g. the training loss) as one metric with steps 0..n-1."""
    timestamp = int(time.time() * 1000)
    metrics = [Metric(name, float(v), timestamp, step) for step, v in enumerate(values)]
    client = mlflow.MlflowClient()
    run_id = mlflow.active_run().info.run_id
    for start in range(0, len(metrics), 1000):  # the REST API takes 1000 metrics a batch
        client.log_batch(run_id, metrics=metrics[start : start + 1000])
