"""Run reuse: a stage's work is keyed by its inputs, params and code version.

The key of a stage run is the SHA-256 of
- the stage name and its params (canonical text, as logged),
- the content digests of its inputs (the training split's images and labels, the upstream
  runs' keys, the base model's fingerprint),
- the code version: a digest of the source files of the science packages the stage runs
  (`data` for prepare, `data` + `diffusion` for the generator stages, those + `classify` for
  classifiers), so editing the classifier does not invalidate trained generators.
A FINISHED run carrying the same key (tag `skindiff.run_key`) in the experiment is re-used
instead of recomputed, and the key names the work folder under the cache, so a stage killed
mid-way resumes from its checkpoints when started again with the same key.
"""

import hashlib
import json
from collections.abc import Mapping
from functools import cache
from pathlib import Path

import mlflow
from mlflow.entities import Run

import skindiff
from skindiff.paths import cache_dir

RUN_KEY_TAG = "skindiff.run_key"


# The science packages whose code decides each stage's results.
STAGE_CODE = {
    "prepare": ("data",),
    "textual_inversion": ("data", "diffusion"),
    "lora": ("data", "diffusion"),
    "generate": ("data", "diffusion"),
    "train_classifier": ("data", "diffusion", "classify"),
}


@cache
def code_version(packages: tuple[str, ...]) -> str:
    """Digest of the Python sources of skindiff's `packages` and of the top-level modules they
    import: a change to them gives new keys."""
    root = Path(skindiff.__file__).parent
    files = [root / "errors.py", root / "paths.py"]
    files += [path for name in packages for path in (root / name).rglob("*.py")]
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def run_key(stage: str, params: Mapping[str, str], inputs: Mapping[str, str]) -> str:
    """The reuse key of a stage run (see the module docstring)."""
    code = code_version(STAGE_CODE[stage])
    payload = {"stage": stage, "params": params, "inputs": inputs, "code": code}
    text = json.dumps(payload, sort_keys=True, default=dict)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def find_finished_run(key: str) -> Run | None:
    """The newest FINISHED run of the active experiment with this key, if any."""
    runs = mlflow.search_runs(
        filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return runs[0] if runs else None


def work_dir(stage: str, key: str) -> Path:
    """Where a stage with this key keeps its checkpoints and outputs between attempts."""
    return cache_dir() / "work" / stage / key
