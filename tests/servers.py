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


class MlflowServer:
    """`mlflow server --backend-store-uri ... [args]` on a free loopback port, artifacts served
    from `root`. `start()` returns once /health answers (it does without credentials); `stop()`
    ends its whole process group (its uvicorn worker goes with it), gracefully or, with
    `crash=True`, at once; `start()` again serves the same store on the same port."""

    def __init__(
        self, root: Path, backend_store_uri: str, *args: str, env: Mapping[str, str] | None = None
    ) -> None:
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.command = [
            *(sys.executable, "-m", "mlflow", "server", "--workers", "1"),
            *("--backend-store-uri", backend_store_uri),
            *("--artifacts-destination", str(root / "artifacts")),
            *("--host", "127.0.0.1", "--port", str(self.port), *args),
        ]
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        log_path = self.root / "server.log"
        with log_path.open("a") as log:
            self.process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        deadline = time.monotonic() + 120
        while not healthy(self.uri):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop(crash=True)
                raise RuntimeError(f"mlflow server did not start:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.25)

    def stop(self, crash: bool = False) -> None:
        if self.process is None:
            return
        os.killpg(self.process.pid, signal.SIGKILL if crash else signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None


@contextmanager
def mlflow_server(
    root: Path, backend_store_uri: str, *args: str, env: Mapping[str, str] | None = None
) -> Iterator[str]:
    """A started MlflowServer for the block; yields its URI and stops it after."""
    server = MlflowServer(root, backend_store_uri, *args, env=env)
    server.start()
    try:
        yield server.uri
    finally:
        server.stop()


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
