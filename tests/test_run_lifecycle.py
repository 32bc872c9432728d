"""A command's runs when its process or its tracking server goes away: SIGTERM and SIGINT end
them KILLED, a rerun ends the run of a SIGKILLed process FAILED and resumes its work folder, an
unreachable server is one line."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

from conftest import FAST, runs_by_stage
from servers import MlflowServer, free_port
from skindiff.cli import _stopped_by_signals, run
from skindiff.data.prepare import PrepareConfig, prepare_scenario
from skindiff.diffusion import generate
from skindiff.errors import SkindiffError
from skindiff.tracking.names import RUN_KEY_TAG, SUPERSEDED_BY_TAG, Stage
from skindiff.tracking.server import unreachable_server
from skindiff.tracking.stage import open_stage_run, require_stage_run, work_dir

CONDITIONS = ("folliculitis", "psoriasis")


def generate_args(seed: int) -> list[str]:
    """A generate command without adapters to train: one 32-px image per training image of
    two conditions, in batches of 8. Each test has its own seed, so its own key and work
    folder."""
    return [
        "generate",
        "--mode",
        "img2img/vanilla",
        "--conditions",
        ",".join(CONDITIONS),
        "--num-per-image",
        "1",
        "--num-inference-steps",
        "4",
        "--output-size",
        "32",
        "--generation-batch-size",
        "8",
        "--seed",
        str(seed),
    ]


# `skindiff <argv>` whose second image batch first does `action`: "kill" SIGKILLs the process,
# "pause" tells the test (file `paused` in the folder argv[2]) and waits for the file `go`.
HOOKED_COMMAND = """
import os, signal, sys, time
from pathlib import Path
from skindiff.cli import _stopped_by_signals, run
from skindiff.data.prepare import PrepareConfig, prepare_scenario
from skindiff.diffusion import generate
from skindiff.errors import SkindiffError

action, folder, argv = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
batch, calls = generate.generate_batch, []

def hooked(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2 and action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if len(calls) == 2 and action == "pause":
        (folder / "paused").touch()
        while not (folder / "go").exists():
            time.sleep(0.1)
    return batch(*args, **kwargs)

generate.generate_batch = hooked
run(argv)
"""


def hooked_command(action: str, folder: Path, argv: list[str], **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", HOOKED_COMMAND, action, str(folder), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def error_lines(stderr: str) -> list[str]:
    # Progress bars share stderr; the error is the one line that starts with "error:".
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def news_lines(stderr: str) -> list[str]:
    """stderr less the progress: bars (`generating:  25%|...`) and the stages' lines
    (`[i/seed-0] lora: done in 1 s, ...`)."""
    return [
        line
        for line in stderr.splitlines()
        if line.strip() and "%|" not in line and not line.startswith("[")
    ]


def assert_server_lost_line(line: str, uri: str) -> None:
    """`line` is the one line of a lost server, naming a file with the traceback behind it."""
    lost = f"error: tracking server {uri} unreachable: [Errno 111] Connection refused"
    assert line.startswith(f"{lost} (details: ") and line.endswith(")"), line
    details = Path(line[len(lost) + len(" (details: ") : -1])
    assert "Traceback" in details.read_text()


def run_command(argv: list[str]) -> int:
    """`skindiff <argv>` in this process; its exit code."""
    with pytest.raises(SystemExit) as done:
        run(argv)
    return done.value.code


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_end_the_runs_killed_in_one_line(
    tracking: str, monkeypatch: pytest.MonkeyPatch, capsys, signum: int
) -> None:
    batch, calls = generate.generate_batch, []

    def signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signum)
        return batch(*args, **kwargs)

    def unhandled(signum: int, frame) -> None:
        raise AssertionError(f"the command did not handle {signal.Signals(signum).name}")

    monkeypatch.setattr(generate, "generate_batch", signalled)
    previous = signal.signal(signum, unhandled)
    try:
        code = run_command(generate_args(seed=1))
        # The command's handler was there only while it ran.
        assert signal.getsignal(signum) is unhandled
    finally:
        signal.signal(signum, previous)
    assert code == 128 + signum
    assert len(calls) == 2  # stopped at once
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = error_lines(err)
    (killed,) = runs_by_stage(tracking)["generate"]
    name = signal.Signals(signum).name
    assert line == f"error: stopped by {name}; runs ended KILLED: {killed.info.run_id}"
    assert killed.info.status == "KILLED"
    # The child run that had finished before the signal keeps its status.
    (prepare,) = runs_by_stage(tracking)["prepare"]
    assert prepare.info.status == "FINISHED"


def test_a_forked_worker_goes_quietly_on_sigterm() -> None:
    """A DataLoader's forked worker inherits the command's handler: there, the signal does what
    it would by default, rather than unwinding a copy of the command."""
    with _stopped_by_signals():
        pid = os.fork()
        if pid == 0:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            finally:
                os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM


def test_a_rerun_ends_the_run_of_a_sigkilled_process_failed(tracking: str, tmp_path: Path) -> None:
    argv = generate_args(seed=2)
    killed = hooked_command("kill", tmp_path, argv)
    _, err = killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL, err[-2000:]
    (dead,) = runs_by_stage(tracking)["generate"]
    assert dead.info.status == "RUNNING"

    assert run_command(argv) == 0
    assert_taken_over(tracking, dead.info.run_id)


def assert_taken_over(experiment: str, dead_run_id: str) -> None:
    """The experiment's generate runs: the dead one FAILED, tagged with the one rerun, which
    FINISHED on the same key."""
    runs = {run.info.run_id: run for run in runs_by_stage(experiment)["generate"]}
    dead = runs.pop(dead_run_id)
    (rerun,) = runs.values()
    assert rerun.info.status == "FINISHED"
    assert dead.info.status == "FAILED"
    assert dead.data.tags[SUPERSEDED_BY_TAG] == rerun.info.run_id
    assert dead.data.tags[RUN_KEY_TAG] == rerun.data.tags[RUN_KEY_TAG]


# MLflow retries for minutes by default; here the outage is known at once.
NO_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


@contextlib.contextmanager
def own_server(root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[MlflowServer, str]]:
    """A tracking server of the test's own (to crash) and an experiment on it, which
    subprocesses log to; the tracking URI of before comes back after."""
    server = MlflowServer(root, f"sqlite:///{root / 'mlflow.db'}")
    server.start()
    previous_uri = mlflow.get_tracking_uri()
    try:
        experiment = mlflow.MlflowClient(server.uri).create_experiment("outage")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment)
        yield server, experiment
    finally:
        mlflow.set_tracking_uri(previous_uri)
        server.stop()


def server_crashed_under(server: MlflowServer, folder: Path, argv: list[str]) -> tuple[int, str]:
    """Runs `skindiff <argv>` without MLflow's retries, crashes the server in its second image
    batch; the command's exit code and stderr."""
    worker = hooked_command("pause", folder, argv, env=os.environ | NO_RETRIES)
    deadline = time.monotonic() + 300
    while not (folder / "paused").exists():
        if worker.poll() is not None or time.monotonic() > deadline:
            worker.kill()
            pytest.fail(worker.communicate()[1][-4000:])
        time.sleep(0.1)
    server.stop(crash=True)
    (folder / "go").touch()
    _, err = worker.communicate(timeout=300)
    return worker.returncode, err


@pytest.mark.slow  # a tracking server of its own and a subprocess
def test_a_server_gone_mid_run_is_one_line_and_the_rerun_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    with own_server(tmp_path / "server", monkeypatch) as (server, experiment):
        argv = generate_args(seed=3)
        code, err = server_crashed_under(server, tmp_path, argv)
        assert code == 2, err[-4000:]
        assert "Traceback" not in err
        (line,) = error_lines(err)
        assert_server_lost_line(line, server.uri)

        server.start()
        mlflow.set_tracking_uri(server.uri)
        mlflow.set_experiment(experiment_id=experiment)
        (dead,) = runs_by_stage(experiment)["generate"]
        assert dead.info.status == "RUNNING"  # nobody could tell the server
        folder = work_dir(Stage.GENERATE, dead.data.tags[RUN_KEY_TAG])
        made = {path: path.stat().st_mtime_ns for path in folder.rglob("*.jpg")}
        # all made before the upload failed: one per training image
        train = prepare_scenario(PrepareConfig(conditions=CONDITIONS, seed=3)).splits.train
        assert len(made) == len(train)

        assert run_command(argv) == 0
        # Resumed: every image was there, none was made again.
        assert {path: path.stat().st_mtime_ns for path in folder.rglob("*.jpg")} == made
        assert_taken_over(experiment, dead.info.run_id)


@pytest.mark.slow  # a tracking server of its own and a subprocess
def test_a_server_gone_under_main_is_one_line_without_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under `main`, generate's run, its pair's and main's own end on the dead server: nothing
    of that reaches the console but the one line."""
    options = FAST | {
        "scenarios": "i",
        "seeds": "25",  # a key of its own: the generate work folder is new
        "archs": "tiny",
        "train_types": "syn",
        "mode": "img2img/vanilla",  # no adapters to train
        "num_per_image": "1",
        "generation_batch_size": "8",
        "near_duplicates": "off",  # its warning is not what this test listens for
    }
    argv = ["main"] + [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    with own_server(tmp_path / "server", monkeypatch) as (server, _):
        code, err = server_crashed_under(server, tmp_path, argv)
    assert code == 2, err[-4000:]
    assert "Traceback" not in err and "ERROR" not in err, err[-4000:]
    (line,) = news_lines(err)
    assert_server_lost_line(line, server.uri)


@pytest.mark.parametrize("credentials", ["", "ada:secret@"])
def test_an_unreachable_server_stops_a_command_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys, credentials: str
) -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    uri = f"http://{credentials}{address}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # set_tracking_uri sets it: restored after
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        assert run_command(["prepare"]) == 2
    finally:
        mlflow.set_tracking_uri(previous_uri)
    shown = f"http://{credentials.replace('secret', '***')}{address}"
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert_server_lost_line(err.rstrip("\n"), shown)


@pytest.mark.slow  # a tracking server of its own
def test_runs_open_on_a_lost_server_end_with_one_try_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two retries, 0 s then 4 s apart: a request to a dead server takes 4 s.
    retries = {"MAX_RETRIES": "2", "BACKOFF_FACTOR": "2", "BACKOFF_JITTER": "0"}
    for name, value in retries.items():
        monkeypatch.setenv(f"MLFLOW_HTTP_REQUEST_{name}", value)
    with own_server(tmp_path / "server", monkeypatch) as (server, experiment):
        mlflow.set_tracking_uri(server.uri)
        mlflow.set_experiment(experiment_id=experiment)
        with (
            pytest.raises(MlflowException) as lost,
            open_stage_run(Stage.MAIN, "main", {}),
            open_stage_run(Stage.MAIN, "i/seed-0", {}),
            open_stage_run(Stage.GENERATE, "i/seed-0/generate", {}),
        ):
            server.stop(crash=True)
            started = time.monotonic()
            mlflow.log_metric("n_synthetic", 1)
        took = time.monotonic() - started
    assert unreachable_server(lost.value)
    # The metric spent the retries; ending the three runs took one try each, not 12 s more.
    assert 4 <= took < 8
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    assert mlflow.active_run() is None


def test_an_mlflow_error_is_a_lost_server_only_when_mlflow_lost_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with pytest.raises(MlflowException) as request:
            mlflow.get_run("0" * 32)
        lost = f"tracking server {uri} unreachable: [Errno 111] Connection refused"
        assert unreachable_server(request.value) == lost
        # A stage's "run not found", raised on it.
        with pytest.raises(SkindiffError) as wrapped:
            require_stage_run("0" * 32, Stage.GENERATE)
        assert unreachable_server(wrapped.value) == lost
        # The summary of failed artifact downloads keeps no cause: the server is asked.
        summary = MlflowException("Failed to download artifacts from path 'synthetic'")
        assert unreachable_server(summary) == lost
        # An answer from a server is no loss; nor is another host's lost connection.
        assert unreachable_server(MlflowException("no run", RESOURCE_DOES_NOT_EXIST)) is None
        try:
            raise OSError("model hub unreachable") from requests.ConnectionError("refused")
        except OSError as hub:
            assert unreachable_server(hub) is None
    finally:
        mlflow.set_tracking_uri(previous_uri)
