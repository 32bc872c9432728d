"""Frozen hyperparameters: the settings `tune` chose on scenario i, which `main` then uses
unchanged for scenarios ii and iii.

They travel as `frozen_params.yaml`, a flat mapping of option name to value
(`ti_learning_rate: '0.0005'`), logged by a `tune` run and packaged in a registered generator.
"""

import tempfile
from collections.abc import Mapping
from pathlib import Path

import mlflow
import yaml

from skindiff.errors import SkindiffError
from skindiff.options import as_text
from skindiff.tracking.runs import download_run_dir, require_stage_run

FROZEN_PARAMS_FILE = "frozen_params.yaml"


def write_frozen_params(params: Mapping[str, str], path: Path) -> Path:
    """Writes the mapping as `frozen_params.yaml` text (values quoted, order kept)."""
    text = yaml.safe_dump({name: as_text(value) for name, value in params.items()}, sort_keys=False)
    path.write_text(text)
    return path


def read_frozen_params(path: Path, source: str = "") -> dict[str, str]:
    """The mapping in a frozen-params file; `source` names it in errors."""
    source = source or str(path)
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise SkindiffError(f"frozen params {source}: cannot read: {err}") from None
    if not isinstance(loaded, dict) or not loaded:
        raise SkindiffError(f"frozen params {source}: expected a mapping of option: value")
    nested = [str(k) for k, v in loaded.items() if isinstance(v, dict | list)]
    if nested:
        raise SkindiffError(f"frozen params {source}: {nested[0]} must be a single value")
    return {str(name): as_text(value) for name, value in loaded.items()}


def load_frozen_params(source: str) -> dict[str, str]:
    """Frozen params from a `tune` run id, a YAML file, or a generator model URI
    (`models:/skin-diff-generator@champion`, `runs:/<id>/generator`)."""
    if source.startswith(("models:/", "runs:/")):
        from skindiff.tracking.registry import generator_frozen_params

        return generator_frozen_params(source)
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise SkindiffError(f"frozen params file not found: {source}")
        return read_frozen_params(path)
    run = require_stage_run(source, "tune")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = download_run_dir(run.info.run_id, FROZEN_PARAMS_FILE, Path(tmp))
        except mlflow.exceptions.MlflowException:
            raise SkindiffError(f"tune run {source} has no {FROZEN_PARAMS_FILE}") from None
        return read_frozen_params(local, f"of tune run {source}")
