"""Shared fixtures: one real MLflow tracking server per session, an isolated cache, demo data."""

import contextlib
import os

# Spinning OpenMP threads make torch ~100x slower when another process (a server, a
# subprocess) competes for the two cores; set before torch is imported anywhere.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Nothing may download in a test: the model hub client answers from its cache or fails at once.
os.environ["HF_HUB_OFFLINE"] = "1"

import logging
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from PIL import Image

from servers import mlflow_server

REPO = Path(__file__).resolve().parents[1]
REAL_METADATA = REPO.parent / "shared" / "data" / "fitzpatrick17k.csv"

# `shard auto` reads these: a suite started as a task of a SLURM job array must see every pair.
for _name in [name for name in os.environ if name.startswith("SLURM_ARRAY_")]:
    del os.environ[_name]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that needs the tracking server is `slow`: the fast lane
    (`pytest -m "not slow"`) is the science code and the CLI, in-process."""
    for item in items:
        if "tracking_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keeps the demo dataset and models of a test session out of the user's ~/.cache."""
    cache = tmp_path_factory.mktemp("skindiff-cache")
    os.environ["SKINDIFF_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def demo_dataset(isolated_cache: Path):
    from skindiff.data.demo import default_demo_dataset

    return default_demo_dataset()


@pytest.fixture(scope="session")
def tracking_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` (SQLite backend, served artifacts) on a free loopback port."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server(root, f"sqlite:///{root / 'mlflow.db'}") as uri:
        yield uri


@pytest.fixture()
def tracking(tracking_server: str, monkeypatch: pytest.MonkeyPatch, request) -> str:
    """Points in-process MLflow and subprocesses at the server, in a fresh experiment."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server)
    mlflow.set_tracking_uri(tracking_server)
    name = f"{request.node.name}-{time.time_ns()}"
    experiment_id = mlflow.create_experiment(name)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    mlflow.set_experiment(experiment_id=experiment_id)
    yield experiment_id
    while mlflow.active_run():
        mlflow.end_run()


def write_dataset(folder: Path, rows: list[dict], image_size: int = 16) -> tuple[Path, Path]:
    """A small Fitzpatrick17k-format dataset: metadata.csv + one real JPEG per row."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(rows):
        shade = (37 * i) % 256
        Image.new("RGB", (image_size, image_size), (shade, 128, 255 - shade)).save(
            images / f"{row['md5hash']}.jpg"
        )
    csv = folder / "metadata.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv, images


def cohort_rows(per_cell: int = 10, conditions: tuple[str, ...] = ("a", "b")) -> list[dict]:
    """Rows with `per_cell` images for every (condition, FST in 1, 2, 5, 6)."""
    return [
        {"md5hash": f"{label}{fst}{k:04d}", "fitzpatrick_scale": fst, "label": label}
        for label in conditions
        for fst in (1, 2, 5, 6)
        for k in range(per_cell)
    ]


ENTRY_POINT = "mlflow.project.entryPoint"
CONDITIONS = ("folliculitis", "psoriasis")
# A few steps of everything: the chain and its bookkeeping are under test, not the quality.
FAST = {
    "conditions": ",".join(CONDITIONS),
    "ti_max_train_steps": "2",
    "ti_train_batch_size": "2",
    "ti_gradient_accumulation_steps": "1",
    "lora_max_train_steps": "2",
    "lora_train_batch_size": "2",
    "num_per_image": "2",
    "num_inference_steps": "4",
    "output_size": "32",
}


def fast_configs(seed: int = 0) -> tuple:
    """(data, textual inversion, lora, generate) configs of a few steps each."""
    from skindiff.data.prepare import PrepareConfig
    from skindiff.diffusion.generate import GenerateConfig
    from skindiff.diffusion.lora import LoraConfig
    from skindiff.diffusion.textual_inversion import TextualInversionConfig

    data = PrepareConfig(conditions=CONDITIONS, seed=seed)
    ti = TextualInversionConfig(
        conditions=CONDITIONS,
        max_train_steps=2,
        train_batch_size=2,
        gradient_accumulation_steps=1,
        seed=seed,
    )
    lora = LoraConfig(max_train_steps=2, train_batch_size=2, seed=seed)
    generate = GenerateConfig(num_per_image=2, num_inference_steps=4, output_size=32, seed=seed)
    return data, ti, lora, generate


def mlflow_run(entry_point: str, experiment_id: str, cwd: Path, **params: str) -> str:
    """Runs an entry point with `mlflow run` (in the experiment given); returns its console
    (stdout and stderr)."""
    args = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", entry_point]
    args += ["--env-manager", "local", "--experiment-id", experiment_id]
    for key, value in params.items():
        args += ["-P", f"{key}={value}"]
    done = subprocess.run(
        args, cwd=cwd, env=os.environ.copy(), capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout + done.stderr


def runs_by_stage(experiment_id: str) -> dict[str, list]:
    runs = mlflow.search_runs([experiment_id], output_format="list")
    stages: dict[str, list] = {}
    for run in runs:
        stages.setdefault(run.data.tags.get(ENTRY_POINT), []).append(run)
    return stages


@contextlib.contextmanager
def keeping_base_pipeline(module) -> Iterator[list]:
    """Makes `module.load_base_pipeline` keep what it loads, so a test can inspect the pipeline
    a trainer used."""
    from skindiff.diffusion.training import load_base_pipeline

    pipelines: list = []

    def keep(base_model: str):
        pipelines.append(load_base_pipeline(base_model))
        return pipelines[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "load_base_pipeline", keep)
        yield pipelines


def recording_calls(
    monkeypatch: pytest.MonkeyPatch, owner, name: str, record: Callable[..., object]
) -> list:
    """Wraps `owner.name` for the test: each call appends `record(*args, **kwargs)` to the
    returned list, then runs the original."""
    calls, original = [], getattr(owner, name)

    def recorded(*args, **kwargs):
        calls.append(record(*args, **kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, recorded)
    return calls


def stock_tiny_pipeline():
    """A fresh stock diffusers pipeline of the built-in tiny model, no progress bars."""
    from diffusers import StableDiffusionPipeline

    from skindiff.diffusion.base_model import resolve_base_model

    pipeline = StableDiffusionPipeline.from_pretrained(
        resolve_base_model("tiny"), safety_checker=None, requires_safety_checker=False
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sample_image(pipeline, prompt: str):
    """A few-step 32 px sample with a fixed seed, as a numpy array: for comparing outputs."""
    import torch

    return pipeline(
        prompt,
        num_inference_steps=3,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


@pytest.fixture()
def library_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog, fed by the loggers of transformers, diffusers and MLflow too (they pass nothing
    to the root logger), with transformers' once-per-process warnings able to log again."""
    from transformers.utils.logging import warning_once

    loggers = [logging.getLogger(name) for name in ("transformers", "diffusers", "mlflow")]
    for logger in loggers:
        logger.addHandler(caplog.handler)
    warning_once.cache_clear()
    yield caplog
    for logger in loggers:
        logger.removeHandler(caplog.handler)
