"""The experiment a command's runs go to, and its mark for the MLflow UI.

The environment may have chosen it already: `mlflow run` opens the run the entry point logs to
(MLFLOW_RUN_ID) in the experiment of its `--experiment-name`/`--experiment-id`, a parent process
passes its experiment on in MLFLOW_EXPERIMENT_ID (`mlflow.set_experiment` sets it), and a user
may set MLFLOW_EXPERIMENT_NAME. Only where none did is the command's own experiment name used.

The MLflow 3 UI opens an experiment of the GenAI kind on its overview (traces, tokens) and one
of the model training kind on its runs. Earlier MLflow 3 releases read the kind from the
experiment tag `mlflow.experimentKind` (and ask for it when it is missing); later ones (3.17
among them) take it from a switch in the sidebar (GenAI / Model training, kept in the browser,
GenAI until changed) for every experiment, which a link sets with
`?workflowType=machine_learning`. The tag is set either way: the UIs that read it open on the
runs without asking, and it records what the experiment holds."""

import os
from collections.abc import Callable
from typing import TypeVar

import mlflow
from mlflow.entities import Experiment, LifecycleStage
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    RESOURCE_ALREADY_EXISTS,
    RESOURCE_DOES_NOT_EXIST,
    ErrorCode,
)

from skindiff.errors import SkindiffError

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"  # the UI's "Model training"; GenAI is genai_development
T = TypeVar("T")


def use_experiment(name: str) -> str:
    """Makes the experiment the environment chose, else the experiment `name` (created if new,
    by whichever of several processes gets there first), the active one; marks it as model
    training unless it has a kind; returns its id."""
    experiment = _chosen_experiment() or _get_or_create(name)
    if experiment.lifecycle_stage != LifecycleStage.ACTIVE:
        raise SkindiffError(
            f"experiment {experiment.name!r} (id {experiment.experiment_id}) is deleted: restore "
            f"it (mlflow experiments restore --experiment-id {experiment.experiment_id}) or "
            "choose another"
        )
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # a kind someone chose stays
        mark_as_training(experiment.experiment_id)
    if mlflow.active_run() is None:
        exported = os.environ.get("MLFLOW_EXPERIMENT_ID")
        mlflow.set_experiment(experiment_id=experiment.experiment_id)
        # set_experiment also exports MLFLOW_EXPERIMENT_ID, which would make this experiment
        # the environment's choice for a later call in this process (another command run
        # in-process with another experiment name).
        if exported is None:
            del os.environ["MLFLOW_EXPERIMENT_ID"]
        else:
            os.environ["MLFLOW_EXPERIMENT_ID"] = exported
    return experiment.experiment_id


def mark_as_training(experiment_id: str) -> None:
    """Tags the experiment as model training. Processes started together may all find the tag
    missing: the server inserts it for the first, and a database with a unique key (PostgreSQL)
    refuses the others' inserts; the tag is then there, which is all they wanted."""
    client = mlflow.MlflowClient()
    try:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    except MlflowException:
        if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags:
            raise


def _chosen_experiment() -> Experiment | None:
    """The experiment of the active run (or of the run `mlflow run` opened), else the one
    MLFLOW_EXPERIMENT_ID names (a parent process's); None if none. MLFLOW_EXPERIMENT_NAME is
    not read here: it is the default of the command's experiment_name, which an option given
    on the command line replaces."""
    client = mlflow.MlflowClient()
    run = mlflow.active_run()
    if run is None and (run_id := os.environ.get("MLFLOW_RUN_ID")):
        run = _existing(lambda: client.get_run(run_id), "MLFLOW_RUN_ID", run_id)
    if run is not None:
        return client.get_experiment(run.info.experiment_id)
    if experiment_id := os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return _existing(
            lambda: client.get_experiment(experiment_id), "MLFLOW_EXPERIMENT_ID", experiment_id
        )
    return None


def _get_or_create(name: str) -> Experiment:
    """The experiment `name`, created if there is none. Creating first and reading on
    RESOURCE_ALREADY_EXISTS has no window between a look and a create for another process to
    create it in (mlflow.set_experiment has one, and loses the race without making the
    experiment active)."""
    client = mlflow.MlflowClient()
    try:
        return client.get_experiment(client.create_experiment(name))
    except MlflowException as err:
        if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    return client.get_experiment_by_name(name)


def _existing(get: Callable[[], T], variable: str, value: str) -> T:
    """`get()`, with a one-line error naming the environment variable if the tracking server
    has no such run or experiment."""
    try:
        return get()
    except MlflowException as err:
        if err.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
    raise SkindiffError(f"{variable}={value}: the tracking server has no such id")
