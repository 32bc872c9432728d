"""A command's runs when its process or its tracking server goes away: SIGTERM and SIGINT end
them KILLED, a rerun ends the run of a SIGKILLed process FAILED and resumes its work folder, an
unreachable server is one line."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from conftest import runs_by_stage
from servers import MlflowServer, free_port
from skindiff.cli import _stopped_by_signals, run
from skindiff.diffusion import generate
from skindiff.tracking.names import RUN_KEY_TAG, SUPERSEDED_BY_TAG, Stage
from skindiff.tracking.stage import work_dir


def generate_args(seed: int) -> list[str]:
    """A generate command without adapters to train: 4 batches of 8 images of 32 px. Each
    test has its own seed, so its own key and work folder."""
    return [
        "generate",
        "--mode",
        "img2img/vanilla",
        "--conditions",
        "folliculitis,psoriasis",
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
from skindiff.diffusion import generate

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


@pytest.mark.slow  # a tracking server of its own and a subprocess
def test_a_server_gone_mid_run_is_one_line_and_the_rerun_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    root = tmp_path / "server"
    server = MlflowServer(root, f"sqlite:///{root / 'mlflow.db'}")
    server.start()
    previous_uri = mlflow.get_tracking_uri()
    try:
        experiment = mlflow.MlflowClient(server.uri).create_experiment("outage")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment)
        # MLflow retries for minutes by default; here the outage is known at once.
        retries = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
        argv = generate_args(seed=3)
        worker = hooked_command("pause", tmp_path, argv, env=os.environ | retries)
        deadline = time.monotonic() + 300
        while not (tmp_path / "paused").exists():
            if worker.poll() is not None or time.monotonic() > deadline:
                worker.kill()
                pytest.fail(worker.communicate()[1][-4000:])
            time.sleep(0.1)
        server.stop(crash=True)
        (tmp_path / "go").touch()
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 2, err[-4000:]
        assert "Traceback" not in err
        assert error_lines(err) == [
            f"error: tracking server {server.uri} unreachable: [Errno 111] Connection refused"
        ]

        server.start()
        mlflow.set_tracking_uri(server.uri)
        mlflow.set_experiment(experiment_id=experiment)
        (dead,) = runs_by_stage(experiment)["generate"]
        assert dead.info.status == "RUNNING"  # nobody could tell the server
        folder = work_dir(Stage.GENERATE, dead.data.tags[RUN_KEY_TAG])
        made = {path: path.stat().st_mtime_ns for path in folder.rglob("*.png")}
        assert len(made) == 32  # all made before the upload failed

        assert run_command(argv) == 0
        # Resumed: every image was there, none was made again.
        assert {path: path.stat().st_mtime_ns for path in folder.rglob("*.png")} == made
        assert_taken_over(experiment, dead.info.run_id)
    finally:
        mlflow.set_tracking_uri(previous_uri)
        server.stop()


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
    assert err == f"error: tracking server {shown} unreachable: [Errno 111] Connection refused\n"
