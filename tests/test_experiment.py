"""The experiment runs go to: the environment's choice first, else a named one created once
however many processes ask at the same moment, marked as model training for the MLflow UI."""

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

from skindiff.errors import SkindiffError
from skindiff.tracking.experiment import EXPERIMENT_KIND_TAG, TRAINING_KIND, use_experiment


@pytest.fixture()
def server(tracking_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """In-process MLflow and subprocesses log to the tracking server, with no experiment or run
    chosen by the environment."""
    for variable in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_server)
    yield tracking_server
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(previous)


def unique(name: str) -> str:
    return f"{name}-{time.time_ns()}"


def kind(experiment_id: str) -> str | None:
    return mlflow.get_experiment(experiment_id).tags.get(EXPERIMENT_KIND_TAG)


def test_a_new_experiment_is_created_marked_and_active(server: str) -> None:
    name = unique("skindiff")
    experiment_id = use_experiment(name)
    assert mlflow.get_experiment_by_name(name).experiment_id == experiment_id
    assert kind(experiment_id) == TRAINING_KIND
    assert "MLFLOW_EXPERIMENT_ID" not in os.environ  # a later call may choose another
    with mlflow.start_run() as run:
        assert run.info.experiment_id == experiment_id


def test_an_existing_experiment_is_reused_and_a_chosen_kind_kept(server: str) -> None:
    plain, genai = unique("plain"), unique("genai")
    plain_id = mlflow.create_experiment(plain)
    genai_id = mlflow.create_experiment(genai, tags={EXPERIMENT_KIND_TAG: "genai_development"})
    assert use_experiment(plain) == plain_id
    assert kind(plain_id) == TRAINING_KIND
    assert use_experiment(genai) == genai_id
    assert kind(genai_id) == "genai_development"


def test_a_parent_processs_experiment_id_chooses_before_the_name(
    server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    by_id = mlflow.create_experiment(unique("by-id"))
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", by_id)
    unused = unique("unused")
    assert use_experiment(unused) == by_id
    assert mlflow.get_experiment_by_name(unused) is None
    assert kind(by_id) == TRAINING_KIND


def test_the_run_mlflow_run_opened_keeps_its_experiment(
    server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `mlflow run` creates the run, then starts the entry point with MLFLOW_RUN_ID (and the
    # run's MLFLOW_EXPERIMENT_ID); a user's MLFLOW_EXPERIMENT_NAME may still be set.
    runs_experiment = mlflow.create_experiment(unique("mlflow-run"))
    opened = mlflow.MlflowClient().create_run(runs_experiment)
    monkeypatch.setenv("MLFLOW_RUN_ID", opened.info.run_id)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", unique("elsewhere"))
    assert use_experiment(unique("unused")) == runs_experiment
    with mlflow.start_run() as run:  # resumes MLFLOW_RUN_ID's run
        assert run.info.run_id == opened.info.run_id

    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)  # start_run may have taken it
    # An active run (a parent process's `main`) keeps its experiment too.
    with mlflow.start_run(experiment_id=runs_experiment):
        assert use_experiment(unique("unused")) == runs_experiment


def test_unusable_choices_stop_in_one_line(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    deleted = unique("deleted")
    deleted_id = mlflow.create_experiment(deleted)
    mlflow.delete_experiment(deleted_id)
    with pytest.raises(SkindiffError, match=rf"experiment '{deleted}' \(id {deleted_id}\) is del"):
        use_experiment(deleted)

    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "987654321")
    with pytest.raises(SkindiffError, match=r"^MLFLOW_EXPERIMENT_ID=987654321: the tracking serv"):
        use_experiment(unique("unused"))


CREATOR = """
import sys, time
from pathlib import Path

import mlflow

from skindiff.tracking.experiment import use_experiment

ready, go = Path(sys.argv[2] + ".ready"), Path(sys.argv[3])
ready.touch()
while not go.exists():
    time.sleep(0.001)
experiment_id = use_experiment(sys.argv[1])
with mlflow.start_run() as run:
    print(experiment_id, run.info.experiment_id)
"""


def test_processes_creating_the_experiment_at_once_all_use_it(server: str, tmp_path: Path) -> None:
    name, go = unique("together"), tmp_path / "go"
    creators = [
        subprocess.Popen(
            [sys.executable, "-c", CREATOR, name, str(tmp_path / str(i)), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    # All of them past their imports, then released together: each finds no experiment and
    # creates it.
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("*.ready"))) < len(creators) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    outputs = [creator.communicate(timeout=120) for creator in creators]
    for creator, (_, stderr) in zip(creators, outputs, strict=True):
        assert creator.returncode == 0, stderr[-3000:]
    experiment_id = mlflow.get_experiment_by_name(name).experiment_id
    assert [stdout.splitlines()[0].split() for stdout, _ in outputs] == [[experiment_id] * 2] * len(
        creators
    )
    assert kind(experiment_id) == TRAINING_KIND
