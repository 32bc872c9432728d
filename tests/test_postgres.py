"""PostgreSQL, as the README proposes for several machines: the backend store of the MLflow
tracking server, and the Optuna storage that `tune` workers in separate processes share. The
tests start a PostgreSQL server of their own from the machine's PostgreSQL programs."""

import os
import pwd
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from glob import glob
from pathlib import Path

import mlflow
import optuna
import psycopg
import pytest
from optuna.trial import TrialState

from conftest import cohort_rows, write_dataset
from servers import free_port, logging_to, mlflow_server
from skindiff.cli import run
from skindiff.tracking.experiment import EXPERIMENT_KIND_TAG, TRAINING_KIND, mark_as_training
from skindiff.tracking.names import STORAGE_TAG, TRIAL_TAG
from skindiff.tracking.tune import TRIAL_RUN_ATTR
from test_tune import TINY_SPACE, start_worker, write_space

pytestmark = pytest.mark.slow  # servers of their own, subprocesses

PROGRAMS = ("initdb", "pg_ctl")
NO_POSTGRES = (
    "no PostgreSQL server programs (initdb, pg_ctl) on PATH or under /usr/lib/postgresql/*/bin; "
    "a CI machine without PostgreSQL skips these tests (install it, e.g. `apt-get install "
    "postgresql`, to run them)"
)


def postgres_programs() -> Path | None:
    """The folder of initdb and pg_ctl: on PATH, else where Debian and Ubuntu put them."""
    on_path = [Path(found).parent for name in PROGRAMS if (found := shutil.which(name))]
    installed = [Path(folder) for folder in sorted(glob("/usr/lib/postgresql/*/bin"))]
    return next(
        (folder for folder in on_path + installed if all((folder / n).exists() for n in PROGRAMS)),
        None,
    )


def server_user() -> dict:
    """PostgreSQL refuses to run as root (a container, a CI machine): then `nobody` owns it."""
    if os.geteuid() != 0:
        return {}
    nobody = pwd.getpwnam("nobody")
    return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A PostgreSQL server of its own (a new cluster, trust authentication, loopback only); yields
    the URL of its `postgres` user, to which a database name is appended."""
    programs = postgres_programs()
    if programs is None:
        pytest.skip(NO_POSTGRES)
    user = server_user()
    # Not under pytest's tmp folder, which only root may enter; short, as the socket's path
    # must fit in 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="skindiff-pg-"))
    if user:
        os.chown(root, user["user"], user["group"])
    data, log = root / "data", root / "commands.log"  # the server's own log is its user's

    def pg_run(program: str, *args: str) -> None:
        with log.open("a") as output:
            done = subprocess.run(
                [programs / program, "-D", data, *args],
                cwd=root,
                stdout=output,
                stderr=output,
                **user,
            )
        if done.returncode != 0:
            server_log = root / "server.log"
            details = log.read_text() + (server_log.read_text() if server_log.exists() else "")
            raise RuntimeError(f"{program} {' '.join(args)} failed:\n{details[-4000:]}")

    port = free_port()
    try:
        pg_run(
            "initdb",
            "-U",
            "postgres",
            "--auth",
            "trust",
            "--locale",
            "C",
            "--encoding",
            "UTF8",
            "--no-sync",
        )
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        pg_run("pg_ctl", "-l", str(root / "server.log"), "-w", "-o", options, "start")
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        if (data / "postmaster.pid").exists():
            pg_run("pg_ctl", "-m", "fast", "-w", "stop")
        shutil.rmtree(root)


def create_database(server: str, name: str) -> str:
    """A new database on the server; its URL."""
    # CREATE DATABASE cannot run in a transaction.
    with psycopg.connect(f"{server}/postgres", autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return f"{server}/{name}"


def query(database: str, sql: str, *args: str) -> list[tuple]:
    with psycopg.connect(database) as connection:
        return connection.execute(sql, args).fetchall()


@pytest.fixture(scope="module")
def mlflow_store(postgres: str) -> str:
    return create_database(postgres, "mlflow")


@pytest.fixture(scope="module")
def postgres_tracking(mlflow_store: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server --backend-store-uri postgresql://...`."""
    with mlflow_server(tmp_path_factory.mktemp("postgres-tracking"), mlflow_store) as uri:
        yield uri


def test_the_tracking_server_keeps_a_stage_run_in_postgresql(
    postgres_tracking: str, mlflow_store: str, tmp_path: Path, request
) -> None:
    csv, images = write_dataset(tmp_path, cohort_rows())
    argv = ["prepare", "--conditions", "a,b", "--flexible-per-condition", "4"]
    argv += ["--metadata-csv", str(csv), "--image-dir", str(images)]
    with logging_to(postgres_tracking, request.node.name) as experiment_id:
        with pytest.raises(SystemExit) as done:
            run(argv)
        assert done.value.code == 0
        (prepare,) = mlflow.search_runs([experiment_id], output_format="list")
    assert prepare.info.status == "FINISHED"
    assert prepare.data.metrics["n_train"] > 0
    stored = query(
        mlflow_store,
        "SELECT status, experiment_id FROM runs WHERE run_uuid = %s",
        prepare.info.run_id,
    )
    assert stored == [("FINISHED", int(experiment_id))]


def test_two_tune_workers_share_a_study_in_postgresql(
    postgres: str, postgres_tracking: str, demo_dataset, tmp_path: Path, request
) -> None:
    from skindiff.diffusion.base_model import resolve_base_model

    resolve_base_model("tiny")  # made here once, not by both workers at the same time
    # As on several machines, with a password (trust authentication ignores it): no run shows it.
    storage = create_database(postgres, "optuna").replace("//postgres@", "//postgres:secret@")
    space = write_space(tmp_path, TINY_SPACE)
    with logging_to(postgres_tracking, request.node.name) as experiment_id:
        workers = [
            start_worker(tmp_path, storage, search_space=space, registered_model="")
            for _ in range(2)
        ]
        for worker in workers:
            output = worker.communicate(timeout=300)[0].decode()
            assert worker.returncode == 0, output[-3000:]
        runs = mlflow.search_runs([experiment_id], output_format="list")

    study = optuna.load_study(study_name="skindiff-tune", storage=storage)
    assert [trial.state for trial in study.trials] == [TrialState.COMPLETE] * 2
    tune_runs = [r for r in runs if r.data.tags.get("mlflow.project.entryPoint") == "tune"]
    worker_runs = [r for r in tune_runs if TRIAL_TAG not in r.data.tags]
    assert [r.info.status for r in worker_runs] == ["FINISHED"] * 2
    assert {r.data.tags[STORAGE_TAG] for r in worker_runs} == {storage.replace("secret", "***")}
    # Each worker ran one trial of the one study.
    trial_runs = {r.info.run_id: r for r in tune_runs if TRIAL_TAG in r.data.tags}
    assert {t.user_attrs[TRIAL_RUN_ATTR] for t in study.trials} == set(trial_runs)
    parents = {r.data.tags["mlflow.parentRunId"] for r in trial_runs.values()}
    assert parents == {r.info.run_id for r in worker_runs}


def test_processes_starting_together_all_mark_a_new_experiment(
    postgres_tracking: str, request
) -> None:
    """Commands started together on a new experiment all find its kind tag missing and all set
    it; PostgreSQL's unique key refuses every insert but the first, which must not stop them."""
    client = mlflow.MlflowClient(postgres_tracking)
    with logging_to(postgres_tracking, request.node.name):
        for attempt in range(5):
            experiment_id = client.create_experiment(f"{request.node.name}-{attempt}")
            start = threading.Barrier(8)

            def mark(experiment_id: str = experiment_id, start: threading.Barrier = start) -> None:
                start.wait()
                mark_as_training(experiment_id)

            with ThreadPoolExecutor(8) as pool:
                done = [pool.submit(mark) for _ in range(8)]
            assert [future.exception() for future in done] == [None] * 8
            tags = client.get_experiment(experiment_id).tags
            assert tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND
