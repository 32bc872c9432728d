"""Real servers for tests: `mlflow server` on a free loopback port, with any backend store, and
logging to one of them for a while."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def mlflow_server(
    root: Path, backend_store_uri: str, *args: str, env: Mapping[str, str] | None = None
) -> Iterator[str]:
    """`mlflow server --backend-store-uri ... [args]` with artifacts served from `root`; yields
    its URI once /health answers (it does without credentials) and stops it after."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log_path = root / "server.log"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri]
    command += ["--artifacts-destination", str(root / "artifacts")]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1", *args]
    with log_path.open("w") as log:
        server = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # its uvicorn worker goes with it
        )
        try:
            deadline = time.monotonic() + 120
            while not healthy(uri):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start:\n{log_path.read_text()}")
                time.sleep(0.5)
            yield uri
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def logging_to(uri: str, experiment_name: str) -> Iterator[str]:
    """In-process MLflow and subprocesses log to `uri`, in a new experiment (its id is yielded);
    the tracking URI of before comes back after, so later tests do not call a stopped server."""
    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        try:
            experiment_id = mlflow.create_experiment(experiment_name)
            patch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
            mlflow.set_experiment(experiment_id=experiment_id)
            yield experiment_id
        finally:
            while mlflow.active_run():
                mlflow.end_run()
            mlflow.set_tracking_uri(previous)
