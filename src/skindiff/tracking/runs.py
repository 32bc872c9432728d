"""Every stage is an MLflow run tagged with its entry point, however it was started."""

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from typing import Any

import mlflow

from skindiff import __version__

ENTRY_POINT_TAG = "mlflow.project.entryPoint"
VERSION_TAG = "skindiff.version"


def flatten_params(config: Any) -> dict[str, str]:
    """A config dataclass (or mapping) as MLflow params: sequences become comma lists."""
    values = asdict(config) if is_dataclass(config) else dict(config)
    return {key: _param_text(value) for key, value in values.items()}


def _param_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()  # as typed on the command line and in MLproject
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return str(value)


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
