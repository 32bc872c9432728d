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

from skindiff.core.settings import as_text
from skindiff.errors import SkindiffError
from skindiff.tracking.names import FROZEN_PARAMS_FILE, Stage
from skindiff.tracking.runs import download_run_dir
from skindiff.tracking.stage import require_stage_run


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


def tune_run_frozen_params(run_id: str) -> dict[str, str]:
    """The frozen params a `tune` run logged."""
    run = require_stage_run(run_id, Stage.TUNE)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = download_run_dir(run.info.run_id, FROZEN_PARAMS_FILE, Path(tmp))
        except mlflow.exceptions.MlflowException:
            raise SkindiffError(f"tune run {run_id} has no {FROZEN_PARAMS_FILE}") from None
        return read_frozen_params(local, f"of tune run {run_id}")
