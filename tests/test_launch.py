"""One stage in several processes of a launch (torchrun; gloo on CPUs): `generate` shares its
batches out, Textual Inversion and LoRA train data-parallel, and only the main process logs."""

import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from conftest import runs_by_stage
from skindiff.diffusion.generate import GenerateConfig, generate_synthetic
from skindiff.tracking.generate import load_synthetic
from skindiff.tracking.names import EMBEDDINGS_DIR, LORA_WEIGHTS_ARTIFACT
from skindiff.tracking.runs import download_run_dir, load_split

pytestmark = pytest.mark.slow  # launches

CONDITIONS = "folliculitis,psoriasis"
GENERATOR = [
    "--conditions", CONDITIONS,
    "--ti-max-train-steps", "2",
    "--ti-train-batch-size", "2",
    "--ti-gradient-accumulation-steps", "1",
    "--lora-max-train-steps", "4",
    "--lora-train-batch-size", "2",
    "--lora-checkpoint-every", "2",
]  # fmt: skip
GENERATE = ["--num-per-image", "2", "--num-inference-steps", "4", "--output-size", "32",
            "--generation-batch-size", "3"]  # fmt: skip
# The command, with rank 0 SIGKILLed in its `kill_at`-th optimizer step (counting every stage's).
KILLED_COMMAND = """
import os, signal, sys
from skindiff.cli import run
import torch

kill_at, step, calls = int(sys.argv[1]), torch.optim.AdamW.step, []

def step_or_die(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == kill_at and os.environ["RANK"] == "0":
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, *args, **kwargs)

torch.optim.AdamW.step = step_or_die
run(sys.argv[2:])
"""


def launch(
    args: list[str], experiment: str, cache: Path, script: Path | None = None
) -> subprocess.CompletedProcess:
    """`skindiff <args>` (or `script <args>`) in 2 processes of one torchrun, one thread each,
    logging to `experiment` of the tracking server in MLFLOW_TRACKING_URI."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    program = [str(script)] if script else ["--no-python", "skindiff"]
    env = {
        "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(),
        "MLFLOW_EXPERIMENT_ID": experiment,
        "SKINDIFF_CACHE": str(cache),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        torchrun + program + args, env=os.environ | env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def launched(tracking_server: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The runs of an uninterrupted launch of `generate` (which trains its adapters first)."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_server)
    try:
        experiment = mlflow.create_experiment(f"launch-{time.time_ns()}")
        cache = tmp_path_factory.mktemp("launched")
        done = launch(["generate", *GENERATOR, *GENERATE], experiment, cache)
        assert done.returncode == 0, done.stderr[-3000:]
        return one_run_per_stage(experiment)
    finally:
        mlflow.set_tracking_uri(previous)


def one_run_per_stage(experiment: str) -> dict[str, mlflow.entities.Run]:
    stages = runs_by_stage(experiment)
    assert {stage: [r.info.status for r in runs] for stage, runs in stages.items()} == {
        stage: ["FINISHED"] for stage in stages
    }
    return {stage: runs[0] for stage, runs in stages.items()}


def test_a_launch_logs_one_run_per_stage_and_generates_one_processs_images(
    launched: dict, tracking: str, tmp_path: Path
):
    runs = launched
    assert set(runs) == {"prepare", "textual_inversion", "lora", "generate"}
    # Data-parallel: each of the 4 steps averaged both processes' losses into one curve.
    history = mlflow.MlflowClient().get_metric_history(runs["lora"].info.run_id, "loss")
    assert [m.step for m in history] == [0, 1, 2, 3]

    made = load_synthetic(runs["generate"].info.run_id, tmp_path / "launched")
    config = GenerateConfig(
        num_per_image=2, num_inference_steps=4, output_size=32, generation_batch_size=3
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process: CPU sums depend on the thread count
    try:
        alone = generate_synthetic(
            config,
            load_split(runs["prepare"].info.run_id, "train"),
            tmp_path / "alone",
            download_run_dir(runs["textual_inversion"].info.run_id, EMBEDDINGS_DIR, tmp_path),
            download_run_dir(runs["lora"].info.run_id, LORA_WEIGHTS_ARTIFACT, tmp_path),
            progress=False,
        )
    finally:
        torch.set_num_threads(threads)
    assert len(made) == len(alone) > 2 * 3  # more batches than processes
    for path, own in zip(made["path"], alone["path"], strict=True):
        assert Path(path).read_bytes() == (tmp_path / "alone" / own).read_bytes(), own


def test_a_launch_killed_mid_training_resumes_to_the_uninterrupted_weights(
    launched: dict, tracking: str, tmp_path: Path
):
    """A launch's LoRA killed in its step 3 (rank 0 SIGKILLed, the launcher stops rank 1) and
    launched again resumes from its step-2 checkpoint to the weights of the uninterrupted
    launch (same settings, same key)."""
    lora = ["lora", *GENERATOR]
    script = tmp_path / "killed.py"
    script.write_text(KILLED_COMMAND)
    # Textual Inversion takes steps 1-2; LoRA dies in its step 3, after its checkpoint 2.
    killed = launch(["5", *lora], tracking, tmp_path / "cache", script)
    assert killed.returncode != 0
    resumed = launch(lora, tracking, tmp_path / "cache")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "lora: resuming from checkpoint step-2" in resumed.stderr
    stages = runs_by_stage(tracking)
    assert sorted(run.info.status for run in stages["lora"]) == ["FAILED", "FINISHED"]
    assert [run.info.status for run in stages["textual_inversion"]] == ["FINISHED"]
    (finished,) = [run for run in stages["lora"] if run.info.status == "FINISHED"]
    weights = [
        download_run_dir(run.info.run_id, LORA_WEIGHTS_ARTIFACT, tmp_path / name).read_bytes()
        for run, name in ((launched["lora"], "whole"), (finished, "resumed"))
    ]
    assert weights[0] == weights[1]
