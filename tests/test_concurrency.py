"""Several processes on the same work: one at a time per work folder, each piece of work done
once, and the same bytes from the same inputs whatever the process."""

import hashlib
import os
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import fast_configs
from skindiff.core.files import work_folder_lock
from skindiff.data.prepare import prepare_scenario
from skindiff.diffusion.generate import generate_synthetic, plan_generation

pytestmark = pytest.mark.slow  # every test here starts subprocesses


def start(script: str, *args: object, **env: str) -> subprocess.Popen:
    """`python -c script args` with the test's environment (its cache) plus `env`."""
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        env=os.environ | env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(processes: list[subprocess.Popen]) -> list[str]:
    """The stdout of every process, once all have exited 0."""
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-4000:]
    return [stdout for stdout, _ in outputs]


def digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder` (hidden ones too) by relative path."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def temporaries(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if ".tmp" in path.name]


@pytest.fixture(scope="module")
def inputs(demo_dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pickle of the fast (textual inversion, lora, generate) configs and 2 training images
    per condition, for the subprocesses."""
    data, ti, lora, generate = fast_configs()
    train = prepare_scenario(data).splits.train.groupby("label").head(2)
    path = tmp_path_factory.mktemp("inputs") / "inputs.pkl"
    path.write_bytes(pickle.dumps((ti, lora, generate, train)))
    return path


HOLD = """
import sys, time
from skindiff.core.files import work_folder_lock

with work_folder_lock(sys.argv[1], holder=sys.argv[2]) as previous:
    print(repr(previous), flush=True)
    time.sleep(600)
"""


def test_the_work_folder_lock_waits_for_its_holder_and_names_a_killed_one(tmp_path: Path):
    folder = tmp_path / "work"
    first = start(HOLD, folder, "run-a")
    assert first.stdout.readline() == "''\n"  # nobody held it before
    second = start(HOLD, folder, "run-b")
    assert f"{folder} is in use by another process" in second.stderr.readline()
    first.kill()
    first.wait()
    # The second gets the folder only now, and learns which holder died holding it.
    assert second.stdout.readline() == "'run-a'\n"
    second.kill()
    second.wait()
    with work_folder_lock(folder, holder="run-c") as previous:
        assert previous == "run-b"
        with work_folder_lock(folder):  # the science code locks again under the tracking layer
            pass
    with work_folder_lock(folder, holder="run-d") as previous:
        assert previous == ""  # run-c let go of it: no stale holder


GENERATE = """
import pickle, sys, time
from pathlib import Path
from skindiff.diffusion import generate

_, _, config, train = pickle.loads(Path(sys.argv[1]).read_bytes())
config = generate.GenerateConfig(**{**vars(config), "mode": "img2img/vanilla"})
saved, save = [], generate._save_image

def counting_save(image, path):
    save(image, path)
    saved.append(path)

generate._save_image = counting_save
ready = Path(sys.argv[3])
ready.touch()
while len(list(ready.parent.glob("ready-*"))) < 2:  # start together
    time.sleep(0.01)
generate.generate_synthetic(config, train, sys.argv[2], progress=False)
print(len(saved))
"""


def test_two_processes_generating_into_one_folder_make_every_image_once(
    inputs: Path, tmp_path: Path
):
    out_dir = tmp_path / "out"
    processes = [start(GENERATE, inputs, out_dir, tmp_path / f"ready-{n}") for n in range(2)]
    saved = sorted(int(stdout) for stdout in finish(processes))
    _, _, config, train = pickle.loads(inputs.read_bytes())
    config = replace(config, mode="img2img/vanilla")
    # One process made every image; the other waited for it and then found them all made.
    assert saved == [0, len(plan_generation(config, train))]
    generate_synthetic(config, train, tmp_path / "single", progress=False)
    assert digests(out_dir) == digests(tmp_path / "single")
    assert not temporaries(tmp_path)


CHAIN = """
import pickle, sys
from pathlib import Path
from skindiff.diffusion.generate import generate_synthetic
from skindiff.diffusion.lora import train_lora
from skindiff.diffusion.textual_inversion import train_textual_inversion

ti, lora, generate, train = pickle.loads(Path(sys.argv[1]).read_bytes())
out = Path(sys.argv[2])
embeddings = train_textual_inversion(ti, train, out / "ti", progress=False).embeddings_dir
weights = train_lora(lora, train, embeddings, out / "lora", progress=False).weights_path
generate_synthetic(generate, train, out / "generate", embeddings, weights, progress=False)
"""


def test_the_generator_chain_writes_the_same_bytes_in_any_process(inputs: Path, tmp_path: Path):
    """Textual Inversion, LoRA and generate in two processes whose sets and dicts of strings
    iterate in different orders (PYTHONHASHSEED): every file they write is byte-identical."""
    seeds = ("1", "2")
    processes = [start(CHAIN, inputs, tmp_path / s, PYTHONHASHSEED=s) for s in seeds]
    finish(processes)
    first, second = (digests(tmp_path / seed) for seed in seeds)
    assert "lora/lora/pytorch_lora_weights.safetensors" in first
    assert any(name.startswith("ti/embeddings/") for name in first)
    assert first == second
    assert not temporaries(tmp_path)
