"""Reading what finished stage runs left: checked upstream runs, artifacts, split manifests."""

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import Metric

from skindiff.errors import SkindiffError
from skindiff.tracking.dry_run import active_plan, is_planned
from skindiff.tracking.names import Stage, split_artifact
from skindiff.tracking.stage import require_stage_run


def fetch_upstream(
    run_id: str, stage: Stage, artifact_path: str, base_model: str, dst: Path
) -> Path:
    """An artifact of a finished upstream `stage` run made with the same base model (its
    tensors would not fit another)."""
    run = require_stage_run(run_id, stage)
    used = run.data.params.get("base_model", "").strip("'")
    if used and used != base_model:
        raise SkindiffError(f"run {run_id} used base_model {used!r}, this stage {base_model!r}")
    return download_run_dir(run_id, artifact_path, dst)


def download_run_dir(run_id: str, artifact_path: str, dst: Path) -> Path:
    """Downloads a run's artifact folder (or file) into `dst` and returns its local path."""
    return Path(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact_path, dst_path=str(dst)
        )
    )


def load_split(prepare_run_id: str, split: str) -> pd.DataFrame:
    """One split manifest of a finished prepare run (or, in a dry run, of a planned one)."""
    if is_planned(prepare_run_id):
        return active_plan().outputs[prepare_run_id][split]
    require_stage_run(prepare_run_id, Stage.PREPARE)
    with tempfile.TemporaryDirectory() as tmp:
        path = download_run_dir(prepare_run_id, split_artifact(split), Path(tmp))
        return pd.read_csv(path, keep_default_na=False)


def log_curve(name: str, values: Sequence[float]) -> None:
    """A per-step curve (e.g. the training loss) as one metric with steps 0..n-1."""
    timestamp = int(time.time() * 1000)
    metrics = [Metric(name, float(v), timestamp, step) for step, v in enumerate(values)]
    client = mlflow.MlflowClient()
    run_id = mlflow.active_run().info.run_id
    for start in range(0, len(metrics), 1000):  # the REST API takes 1000 metrics a batch
        client.log_batch(run_id, metrics=metrics[start : start + 1000])
