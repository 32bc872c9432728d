"""Logs the `download` stage: its settings, the per-image report and the counts."""

import tempfile
from pathlib import Path

import mlflow

from skindiff.data.config import DownloadConfig
from skindiff.data.download import (
    DownloadSummary,
    download_images,
    rows_to_download,
    summary_metrics,
)
from skindiff.options import DOWNLOAD
from skindiff.tracking.names import DOWNLOAD_REPORT, Stage
from skindiff.tracking.stage import open_stage_run


def run_download(config: DownloadConfig, progress: bool = True) -> tuple[str, DownloadSummary]:
    """Fetches the images of `config.metadata_csv` into `config.image_dir` as an MLflow run;
    returns the run id and what happened."""
    rows = rows_to_download(config)
    with open_stage_run(Stage.DOWNLOAD, str(Stage.DOWNLOAD), DOWNLOAD.values(config)) as run:
        summary = download_images(rows, Path(config.image_dir), config, progress)
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / DOWNLOAD_REPORT
            summary.report.to_csv(report, index=False)
            mlflow.log_artifact(str(report))
        mlflow.log_metrics(summary_metrics(summary))
    return run.info.run_id, summary
