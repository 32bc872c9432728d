"""The SLURM scripts of the docs (docs/slurm/) on a real SLURM: a controller and one compute
node on localhost, started by the test from the machine's SLURM and munge programs. A job array
of `main` runs one pair per task (`--shard auto`), then `report` runs as a job depending on it."""

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from conftest import CONDITIONS, REPO, runs_by_stage
from servers import free_port
from skindiff.tracking.names import PARENT_RUN_TAG
from test_pipeline import main_calls_by_shard

pytestmark = pytest.mark.slow  # daemons of their own, a study in subprocesses

# Debian and Ubuntu put the daemons in /usr/sbin, which is not on every PATH.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
PROGRAMS = ("slurmctld", "slurmd", "sbatch", "scontrol", "munged", "mungekey")
NO_SLURM = (
    "no SLURM or munge programs ({missing}) on PATH or in /usr/sbin; a CI machine without SLURM "
    "skips this test (install it, e.g. `apt-get install slurm-wlm`, to run it)"
)
# The sizes of the docs' scripts, made to fit one node of this machine: 2 tasks, no GPU, one
# CPU and a little memory each, minutes. Everything else runs as the docs give it.
SIZES = {
    "array": "0-1",
    "gres": "none",
    "cpus-per-task": "1",
    "mem": "500M",
    "time": "0:20:00",
}
# A pair of the demo's `main` in seconds (the options after the script's name win): the demo
# data and `tiny` model in place of the paper's paths, a few steps of everything, 2 seeds.
TINY_MAIN = [
    *("--metadata-csv", "", "--image-dir", "", "--frozen-params", "", "--base-model", "tiny"),
    *("--scenarios", "i", "--seeds", "0,1", "--archs", "tiny", "--train-types", "real"),
    *("--light-test", "false", "--synthetic-quality", "false"),
    *("--conditions", ",".join(CONDITIONS)),
    *("--ti-max-train-steps", "2", "--ti-train-batch-size", "2"),
    *("--ti-gradient-accumulation-steps", "1"),
    *("--lora-max-train-steps", "2", "--lora-train-batch-size", "2"),
    *("--num-per-image", "2", "--num-inference-steps", "4", "--output-size", "32"),
    *("--epochs", "1", "--batch-size", "16", "--image-size", "32"),
]
# JobStates of a job that will not change any more (see `squeue --help`'s state list).
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


def program(name: str) -> str:
    return shutil.which(name, path=SEARCH_PATH) or name


class Daemons:
    """munged, slurmctld and slurmd in the foreground of processes of this test, configured in
    `folder`; `env` points SLURM's commands at them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.conf = {"SLURM_CONF": str(folder / "slurm.conf")}
        self.env = os.environ | self.conf
        self.processes: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, *args: str) -> None:
        log = (self.folder / f"{name}.out").open("w")
        process = subprocess.Popen(
            [program(name), *args], stdout=log, stderr=subprocess.STDOUT, env=self.env
        )
        self.processes.append((name, process))

    def failure(self) -> str | None:
        """The last error line of a daemon that has exited, None while all run."""
        for name, process in self.processes:
            if process.poll() is not None:
                lines = (self.folder / f"{name}.out").read_text().splitlines()
                errors = [line for line in lines if re.search(r"error|fatal", line, re.I)]
                return f"{name} exited with {process.returncode}: {(errors or lines or [''])[-1]}"
        return None

    def stop(self) -> None:
        for _, process in reversed(self.processes):
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def slurm_conf(folder: Path, munge_socket: Path, node: str) -> str:
    """A cluster of one node, this machine: root runs everything, no cgroups, no accounting."""
    found = subprocess.run([program("slurmd"), "-C"], capture_output=True, text=True, check=True)
    hardware = found.stdout.splitlines()[0].split(" ", 1)[1]  # CPUs=2 ... RealMemory=24105
    return "\n".join([
        "ClusterName=skindifftest",
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={free_port()}",
        f"SlurmdPort={free_port()}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        f"StateSaveLocation={folder / 'state'}",
        f"SlurmdSpoolDir={folder / 'spool'}",
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
        f"SlurmdPidFile={folder / 'slurmd.pid'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "MpiDefault=none",
        "ReturnToService=2",
        f"NodeName={node} NodeAddr=127.0.0.1 {hardware} State=UNKNOWN",
        f"PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])  # fmt: skip


@pytest.fixture(scope="module")
def slurm() -> Iterator[dict[str, str]]:
    """A SLURM of one node on localhost; yields the variables its commands need. Skips, with
    the daemon's own error, where SLURM cannot start here."""
    missing = [name for name in PROGRAMS if not shutil.which(name, path=SEARCH_PATH)]
    if missing:
        pytest.skip(NO_SLURM.format(missing=", ".join(missing)))
    if os.geteuid() != 0:
        pytest.skip("SLURM's daemons run as root here (SlurmUser=root); run the test as root")
    # A short folder: munge's socket path must fit a socket address (108 bytes).
    folder = Path(tempfile.mkdtemp(prefix="slurm-"))
    for name in ("state", "spool", "munge"):
        (folder / name).mkdir()
    munge = folder / "munge"
    munge.chmod(0o755)  # munged checks its folders are not writable by others
    key = munge / "munge.key"
    subprocess.run([program("mungekey"), "-c", "-k", str(key)], check=True, capture_output=True)
    node = socket.gethostname().split(".")[0]  # slurmctld runs where SlurmctldHost names
    (folder / "slurm.conf").write_text(slurm_conf(folder, munge / "socket", node))
    daemons = Daemons(folder)
    try:
        daemons.start(
            "munged",
            *("--foreground", "--force", f"--socket={munge / 'socket'}", f"--key-file={key}"),
            *(f"--pid-file={munge / 'pid'}", f"--seed-file={munge / 'seed'}"),
            f"--log-file={munge / 'munged.log'}",
        )
        wait_for(lambda: daemons.failure() or (munge / "socket").exists(), 30, "munged")
        daemons.start("slurmctld", "-D", "-i", "-vv")
        daemons.start("slurmd", "-D", "-N", node, "-vv")
        wait_for(lambda: daemons.failure() or node_idle(daemons.env), 60, "the node")
        failed = daemons.failure()
        if failed:
            pytest.skip(f"SLURM does not start here: {failed}")
        yield daemons.conf
    finally:
        if not daemons.failure():  # a job still running would outlive the daemons
            subprocess.run(
                [program("scancel"), "--full", "--user=root"], env=daemons.env, timeout=60
            )
        daemons.stop()
        shutil.rmtree(folder, ignore_errors=True)


def wait_for(ready, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        if time.monotonic() > deadline:
            pytest.skip(f"SLURM does not start here: {what} is not ready after {seconds} s")
        time.sleep(0.5)


def node_idle(env: dict[str, str]) -> bool:
    done = subprocess.run(
        [program("sinfo"), "--noheader", "--format=%T"], env=env, capture_output=True, text=True
    )
    return done.stdout.strip() == "idle"


def sized(script: str) -> str:
    """A docs' sbatch script with the SIZES its #SBATCH lines give replaced."""
    for name, value in SIZES.items():
        line = re.compile(rf"^#SBATCH --{name}=.*$", re.M)
        script = line.sub(f"#SBATCH --{name}={value}", script)
    return script


def job_states(job_id: str, env: dict[str, str]) -> dict[str, tuple[str, str]]:
    """(JobState, Reason) of the job and, for an array, each of its tasks, by job id."""
    shown = subprocess.run(
        [program("scontrol"), "--oneliner", "show", "job", job_id],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    states = {}
    for line in shown.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        task = fields.get("ArrayTaskId")
        name = f"{fields['ArrayJobId']}_{task}" if task else fields["JobId"]
        states[name] = (fields["JobState"], fields["Reason"])
    return states


def test_the_docs_job_array_runs_one_pair_per_task_then_the_report(
    slurm: dict[str, str], tracking: str, demo_dataset, tmp_path: Path
) -> None:
    scripts = tmp_path / "slurm"
    shutil.copytree(REPO / "docs" / "slurm", scripts)
    main = (scripts / "main.sbatch").read_text()
    assert [name for name in SIZES if f"\n#SBATCH --{name}=" not in main] == []
    for name in ("main.sbatch", "report.sbatch"):
        (scripts / name).write_text(sized((scripts / name).read_text()))
    # The tasks log to this test's server and experiment, with this test's skindiff: sbatch
    # passes on the environment it was given.
    env = (
        os.environ
        | slurm
        | {
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
            "OMP_NUM_THREADS": "1",
        }
    )
    started = time.monotonic()
    submitted = subprocess.run(
        ["bash", str(scripts / "submit.sh"), *TINY_MAIN],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert submitted.returncode == 0, submitted.stderr
    array, report = re.findall(r"Submitted batch job (\d+)", submitted.stdout)

    states: dict[str, tuple[str, str]] = {}
    while time.monotonic() - started < 900:
        states = job_states(array, env) | job_states(report, env)
        never = states[report][1] == "DependencyNeverSatisfied"
        if never or all(state in ENDED for state, _ in states.values()):
            break
        time.sleep(2)
    logs = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in tmp_path.glob("*.log"))
    assert {job: state for job, (state, _) in states.items()} == {
        f"{array}_0": "COMPLETED",
        f"{array}_1": "COMPLETED",
        report: "COMPLETED",
    }, logs
    print(f"SLURM: array and report done in {time.monotonic() - started:.0f} s")

    # Each task was a `main` run of its own, one worker of 2 with one pair of its own.
    stages = runs_by_stage(tracking)
    calls = main_calls_by_shard(stages)
    assert {shard: run.data.params["shard"] for shard, run in calls.items()} == {
        "1/2": "auto",
        "2/2": "auto",
    }
    for shard, seed in (("1/2", 0), ("2/2", 1)):
        parent = calls[shard].info.run_id
        pairs = mlflow.search_runs(
            [tracking], f"tags.{PARENT_RUN_TAG} = '{parent}'", output_format="list"
        )
        assert [pair.info.run_name for pair in pairs] == [f"i/seed-{seed}"]
    # The report job read both tasks' pairs: one group, the mean over both seeds.
    assert [run.info.status for run in stages["report"]] == ["FINISHED"]
    table = pd.read_csv(tmp_path / "report" / "table2_scenario_i.csv")
    (row,) = table[(table["arch"] == "tiny") & (table["train_type"] == "real")].itertuples()
    assert row.n_seeds == 2
