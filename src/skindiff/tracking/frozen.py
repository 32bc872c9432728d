"""Frozen hyperparameters: the settings `tune` chose on scenario i, which `main` then uses
unchanged for scenarios ii and iii; and which of `main`'s test images scored the tuning
objective that chose them.

They travel as `frozen_params.yaml`, a flat mapping of option name to value
(`ti_learning_rate: '0.0005'`), logged by a `tune` run and packaged in a registered generator.
A tune call with seeds logs one mapping per data seed, `frozen_params_by_seed.yaml`
(`42: {ti_learning_rate: '0.0005'}`), and runs one study per seed under its own run.

The objective of a tune on seed s is scored on scenario i's test split of s (with
exclude_test_of) or its validation split (the paper's protocol). With exclude_test_of ii,iii
none of those images is a test image of ii or iii of seed s, but most are of every other seed:
their test split, the dark images outside that seed's dark flexible subset, holds about 46 of
the 56 images of the dark flexible subset of s. `tuning_overlap` counts them from the data.
"""

import logging
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import mlflow
import pandas as pd
import yaml
from mlflow.entities import Run

from skindiff.core.settings import as_text
from skindiff.data.config import PrepareConfig, Scenario
from skindiff.data.splits import build_scenario_splits
from skindiff.errors import SkindiffError
from skindiff.options import DATA
from skindiff.report import TUNING_OVERLAP_COLUMNS
from skindiff.tracking.names import (
    FROZEN_PARAMS_BY_SEED_FILE,
    FROZEN_PARAMS_FILE,
    TUNE_PROTOCOL_TAG,
    TUNE_SEEDS_TAG,
    Stage,
)
from skindiff.tracking.runs import download_run_dir
from skindiff.tracking.stage import child_runs, require_stage_run

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Data options a tune and a main run must share for the tune's splits to be rebuilt on main's
# data, and those that make the tune's splits (its seed's, scenario i's).
SAME_DATA_OPTIONS = ("metadata_csv", "conditions", "light_fst", "dark_fst")
TUNE_SPLIT_OPTIONS = ("seed", "exclude_test_of", "val_fraction", "flexible_per_condition")


def write_frozen_params(params: Mapping[str, str], path: Path) -> Path:
    """Writes the mapping as `frozen_params.yaml` text (values quoted, order kept)."""
    text = yaml.safe_dump({name: as_text(value) for name, value in params.items()}, sort_keys=False)
    path.write_text(text)
    return path


def write_frozen_params_by_seed(by_seed: Mapping[int, Mapping[str, str]], path: Path) -> Path:
    """Writes seed -> mapping as `frozen_params_by_seed.yaml` text."""
    frozen = {
        seed: {name: as_text(value) for name, value in params.items()}
        for seed, params in by_seed.items()
    }
    path.write_text(yaml.safe_dump(frozen, sort_keys=False))
    return path


def read_frozen_params(path: Path, source: str = "") -> dict[str, str]:
    """The mapping in a frozen-params file; `source` names it in errors."""
    source = source or str(path)
    loaded = _load_mapping(path, source)
    nested = [str(k) for k, v in loaded.items() if isinstance(v, dict | list)]
    if nested:
        raise SkindiffError(f"frozen params {source}: {nested[0]} must be a single value")
    return {str(name): as_text(value) for name, value in loaded.items()}


def read_frozen_params_by_seed(path: Path, source: str) -> dict[int, dict[str, str]]:
    """The seed -> mapping in a `frozen_params_by_seed.yaml` file."""
    by_seed = {}
    for seed, params in _load_mapping(path, source).items():
        if not isinstance(seed, int) or not isinstance(params, dict) or not params:
            raise SkindiffError(f"frozen params {source}: expected seed: {{option: value}}")
        by_seed[seed] = {str(name): as_text(value) for name, value in params.items()}
    return by_seed


def _load_mapping(path: Path, source: str) -> dict:
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise SkindiffError(f"frozen params {source}: cannot read: {err}") from None
    if not isinstance(loaded, dict) or not loaded:
        raise SkindiffError(f"frozen params {source}: expected a mapping of option: value")
    return loaded


def objective_split(data: PrepareConfig) -> str:
    """The split of scenario i a tune with `data` scores trials on: without other scenarios'
    test images its validation split has no dark image left, so its test split."""
    return "test" if data.exclude_test_of else "val"


def objective_images(cohort: pd.DataFrame, tuned_on: PrepareConfig) -> pd.DataFrame:
    """The rows of `cohort` that scored the objective of a tune with data settings `tuned_on`."""
    splits = build_scenario_splits(
        cohort,
        Scenario.I,
        tuned_on.seed,
        val_fraction=tuned_on.val_fraction,
        per_condition=tuned_on.flexible_per_condition,
        exclude_test_of=tuned_on.exclude_test_of,
    )
    return getattr(splits, objective_split(tuned_on))


def tuning_overlap(
    cohort: pd.DataFrame,
    tuned_on: PrepareConfig,
    pairs: Iterable[tuple[Scenario | str, int]],
    per_condition: int,
) -> pd.DataFrame:
    """Per (scenario, seed) of `pairs` (TUNING_OVERLAP_COLUMNS): its test images (with
    flexible subsets of `per_condition` images per condition) and how many of them scored the
    objective of a tune with data settings `tuned_on`. `cohort` is the cohort as prepare splits
    it (the images it dropped left out)."""
    scored = set(objective_images(cohort, tuned_on)["md5hash"])
    rows = []
    for scenario, seed in pairs:
        test = build_scenario_splits(cohort, scenario, seed, per_condition=per_condition).test
        n_scored = int(test["md5hash"].isin(scored).sum())
        rows.append([str(scenario), seed, tuned_on.seed, len(test), n_scored])
    return pd.DataFrame(rows, columns=TUNING_OVERLAP_COLUMNS)


@dataclass(frozen=True)
class TunedSettings:
    """Frozen params and, where known, the tune run (one data seed's study) that chose them."""

    params: dict[str, str]
    tune_run: Run | None = None  # None: unknown (a YAML file, a generator of no tune run)

    @property
    def seed(self) -> int | None:
        """The data seed the params were tuned on, where known."""
        return int(self.tune_run.data.params["seed"]) if self.tune_run else None

    @property
    def protocol(self) -> str | None:
        return self.tune_run.data.tags.get(TUNE_PROTOCOL_TAG) if self.tune_run else None

    def tuned_on(self, data: PrepareConfig) -> PrepareConfig | None:
        """The tune's data settings (scenario i, its seed, exclude_test_of, val_fraction and
        flexible subset size) on `data`'s dataset; None where the tune run is unknown or used
        another dataset or cohort (its splits are then not these images')."""
        if self.tune_run is None:
            return None
        params = self.tune_run.data.params
        mine = DATA.values(data)
        differing = [
            name
            for name in SAME_DATA_OPTIONS
            if _comparable(name, params.get(name)) != _comparable(name, mine[name])
        ]
        if differing:
            logger.warning(
                "tune run %s used other data (%s): the test images that scored its objective "
                "are not counted",
                self.tune_run.info.run_id,
                ", ".join(f"{name} {params.get(name)!r}" for name in differing),
            )
            return None
        split = {name: params[name] for name in TUNE_SPLIT_OPTIONS if name in params}
        return DATA.with_values(data, split | {"scenario": Scenario.I})


def _comparable(name: str, value: str | None) -> object:
    """A data option's text as it decides the cohort: a resolved path, a set of items."""
    if value is None:
        return None
    if name == "metadata_csv":
        return str(Path(value).expanduser().resolve()) if value else ""
    return frozenset(value.split(","))


@dataclass(frozen=True)
class FrozenSource:
    """What `main --frozen-params` names: one set of settings for every seed, or one per data
    seed (a tune call with seeds)."""

    name: str
    shared: TunedSettings | None = None
    by_seed: dict[int, TunedSettings] = field(default_factory=dict)

    def for_seeds(self, seeds: Sequence[int], fallback: int | None) -> dict[int, TunedSettings]:
        """The settings of each of `seeds`: a seed tuned on its own gets its own, another the
        `fallback` seed's; without a fallback such a seed is refused."""
        if self.shared is not None:
            return dict.fromkeys(seeds, self.shared)
        tuned = ",".join(map(str, self.by_seed))
        if fallback is not None and fallback not in self.by_seed:
            raise SkindiffError(
                f"frozen_fallback_seed {fallback}: frozen params {self.name} were tuned on "
                f"seeds {tuned} only"
            )
        missing = [seed for seed in seeds if seed not in self.by_seed]
        if missing and fallback is None:
            raise SkindiffError(
                f"frozen params {self.name} were tuned per seed ({tuned}) and have none for "
                f"seed {','.join(map(str, missing))}: tune it too, or give "
                "--frozen-fallback-seed <a tuned seed> to use that seed's"
            )
        return {seed: self.by_seed.get(seed) or self.by_seed[fallback] for seed in seeds}


def tune_run_source(run_id: str) -> FrozenSource:
    """The settings a `tune` run froze: a worker's for every seed, or, for a call with seeds,
    each seed's with the run of its study."""
    run = require_stage_run(run_id, Stage.TUNE)
    if TUNE_SEEDS_TAG not in run.data.tags:
        frozen = _tune_run_file(run_id, FROZEN_PARAMS_FILE, read_frozen_params)
        return FrozenSource(run_id, shared=TunedSettings(frozen, run))
    frozen = _tune_run_file(run_id, FROZEN_PARAMS_BY_SEED_FILE, read_frozen_params_by_seed)
    studies = {int(r.data.params["seed"]): r for r in child_runs(run, "FINISHED")}
    by_seed = {seed: TunedSettings(params, studies.get(seed)) for seed, params in frozen.items()}
    return FrozenSource(run_id, by_seed=by_seed)


def _tune_run_file(run_id: str, name: str, read: Callable[[Path, str], T]) -> T:
    """`read(local copy, source)` of the file `name` a tune run logged."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = download_run_dir(run_id, name, Path(tmp))
        except mlflow.exceptions.MlflowException:
            raise SkindiffError(f"tune run {run_id} has no {name}") from None
        return read(local, f"of tune run {run_id}")
