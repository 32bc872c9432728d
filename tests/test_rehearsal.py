"""The real path, rehearsed on a CPU: Stable Diffusion 2.1 base's architecture (`sd21-random`:
the real configs, random weights) saved as a local diffusers folder, the layout a download of
stabilityai/stable-diffusion-2-1-base gives, then

- `main --dry-run` (every stage `run`), `main` at 64 px under bf16 autocast (every stage, one
  scenario and seed, all three train types, ResNet-18 without ImageNet weights), `main
  --dry-run` again (every stage `re-use`);
- `tune` with one trial, registering its generator;
- the generator loaded in a fresh process by `models:/...@champion` and asked for images.

One base-model folder and one chain serve every test of the module. The commands run as
subprocesses: accelerate fixes a process's mixed precision once, and the registry must load in
a process that made nothing. The peak memory of the largest one is printed and bounded.
"""

import base64
import io
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from PIL import Image

from skindiff.diffusion.base_model import build_builtin_pipeline
from skindiff.tracking.names import ENTRY_POINT_TAG, Stage

pytestmark = [pytest.mark.rehearsal, pytest.mark.slow]

# A few steps of everything at 64 px (8 x 8 latents): the architecture's shapes are under
# test, not the quality.
SETTINGS = [
    "--resolution", "64", "--output-size", "64", "--mixed-precision", "bf16",
    "--conditions", "folliculitis,psoriasis",
    "--ti-max-train-steps", "2", "--ti-train-batch-size", "2",
    "--ti-gradient-accumulation-steps", "1",
    "--lora-max-train-steps", "2", "--lora-train-batch-size", "2",
    "--num-per-image", "1", "--num-inference-steps", "4",
    "--epochs", "1", "--image-size", "64", "--weights", "none",
]  # fmt: skip
PAIR = ["--scenarios", "i", "--seeds", "0", "--archs", "resnet18"]
MAX_PEAK_GIB = 16  # measured: about 10 GiB (docs/testing.md)
GENERATE_SCRIPT = """
import json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(pd.DataFrame(
    {"image": [sys.argv[2]], "condition": ["psoriasis"], "target_fst": [6], "n": [2]}
))
print(json.dumps({"rows": len(out), "image": out["image"][0]}))
"""


def command(env: dict[str, str], *args: str) -> str:
    """Runs a skindiff command in a process of its own, with `env`; returns its console."""
    cli = [sys.executable, "-c", "from skindiff.cli import run; run()", *args]
    done = subprocess.run(cli, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout + done.stderr


def peak_gib() -> float:
    """The largest resident set of the child processes waited for so far (Linux: KiB)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


@pytest.fixture(scope="module")
def sd21_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "stable-diffusion-2-1-base"
    build_builtin_pipeline("sd21-random").save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def rehearsal(
    sd21_folder: Path, tracking_server: str, demo_dataset, tmp_path_factory: pytest.TempPathFactory
) -> dict:
    """The chain every test reads: dry run, main, dry run, tune (run once for the module)."""
    mlflow.set_tracking_uri(tracking_server)
    experiment = f"rehearsal-{time.time_ns()}"
    # The experiment by name: not one another test's in-process MLflow left in the environment.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_EXPERIMENT_ID"}
    env |= {"MLFLOW_TRACKING_URI": tracking_server, "MLFLOW_EXPERIMENT_NAME": experiment}
    work = tmp_path_factory.mktemp("rehearsal")
    main = ["main", "--base-model", str(sd21_folder), *SETTINGS, *PAIR]
    started = time.monotonic()
    before = command(env, *main, "--dry-run")
    console = command(env, *main)
    after = command(env, *main, "--dry-run")
    tune = command(
        env, "tune", "--base-model", str(sd21_folder), *SETTINGS, "--arch", "resnet18",
        "--n-trials", "1", "--storage", f"sqlite:///{work / 'optuna.db'}",
        "--search-space", str(_space(work)), "--registered-model", experiment,
    )  # fmt: skip
    return {
        "experiment": mlflow.get_experiment_by_name(experiment).experiment_id,
        "model": experiment,
        "main": console,
        "before": before,
        "after": after,
        "tune": tune,
        "minutes": (time.monotonic() - started) / 60,
        "source": str(demo_dataset.image_dir / os.listdir(demo_dataset.image_dir)[0]),
    }


def _space(folder: Path) -> Path:
    """A search space of generation settings only: one trial re-uses nothing of main's chain
    (tune leaves other scenarios' test images out), and its training stays a few steps."""
    path = folder / "space.yaml"
    path.write_text("strength: {low: 0.5, high: 0.75}\nguidance_scale: {low: 1.5, high: 2.5}\n")
    return path


def plan_lines(console: str) -> dict[str, str]:
    """Stage name -> what the dry run plans for it ("run", "re-use")."""
    return {
        line.split()[1]: line.split()[2]
        for line in console.splitlines()
        if line.startswith("i/seed-0 ")
    }


def test_main_runs_every_stage_of_the_sd21_architecture(
    rehearsal: dict, capsys: pytest.CaptureFixture
) -> None:
    runs = mlflow.search_runs([rehearsal["experiment"]], output_format="list")
    stages = {(r.data.tags[ENTRY_POINT_TAG], r.info.run_name): r for r in runs}
    assert all(r.info.status == "FINISHED" for r in runs)
    for train_type in ("real", "syn", "real+syn"):
        trained = stages[(Stage.TRAIN_CLASSIFIER, f"i/seed-0/resnet18/{train_type}")]
        assert 0 <= trained.data.metrics["test_f1_macro"] <= 1
    generate = stages[(Stage.GENERATE, "i/seed-0/generate/img2img/ti+lora")]
    assert generate.data.params["mixed_precision"] == "bf16"
    assert generate.data.params["base_model"] == str(Path(generate.data.params["base_model"]))
    folder = mlflow.artifacts.download_artifacts(
        run_id=generate.info.run_id, artifact_path="synthetic/images"
    )
    image = Image.open(next(Path(folder).iterdir()))
    assert image.size == (64, 64)
    assert any(low < high for low, high in image.getextrema())  # not a blank image
    assert (Stage.SYNTHETIC_QUALITY, "i/seed-0/synthetic_quality") in stages
    with capsys.disabled():
        print(
            f"\nrehearsal: {rehearsal['minutes']:.1f} min, peak memory of a command "
            f"{peak_gib():.1f} GiB"
        )
    assert peak_gib() < MAX_PEAK_GIB


def test_the_dry_run_plans_every_stage_then_reuses_it(rehearsal: dict) -> None:
    before, after = plan_lines(rehearsal["before"]), plan_lines(rehearsal["after"])
    assert set(before) == set(after) and len(before) >= 10
    assert set(before.values()) == {"run"} and set(after.values()) == {"re-use"}
    assert "stage runs: 0 to run" in rehearsal["after"]
    # the UNet's FLOPs are SD 2.1's: its training steps cost more than a GFLOP each at 64 px
    totals = next(line for line in rehearsal["before"].splitlines() if line.startswith("total"))
    assert "TFLOP" in totals or "GFLOP" in totals


def test_tune_registers_a_generator_that_loads_in_a_fresh_process(rehearsal: dict) -> None:
    assert "alias champion" in rehearsal["tune"]
    uri = f"models:/{rehearsal['model']}@champion"
    done = subprocess.run(
        [sys.executable, "-c", GENERATE_SCRIPT, uri, rehearsal["source"]],
        capture_output=True,
        text=True,
        env=os.environ | {"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["rows"] == 2
    assert Image.open(io.BytesIO(base64.b64decode(out["image"]))).size == (64, 64)
    assert peak_gib() < MAX_PEAK_GIB
