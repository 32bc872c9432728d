"""Whether synthetic images show the skin type they were made for, by their skin tone (ITA, see
`skindiff.data.skin_tone`), and the replacements the optional `skin_tone_filter` asks for.

A synthetic image of target Fitzpatrick type 5 or 6 is on target at ITA <= `dark_ita_max`
(10 degrees: Del Bino's brown or dark), one of type 1 or 2 above `light_ita_min` (28: intermediate
or lighter), one of type 3 or 4 in between. An image with too little skin to measure is off
target. A replacement of plan row (source, index) at attempt a has its own seed, derived from
the row's seed and a, and its own file, so every attempt is reproducible and resumable.
"""

import math
from pathlib import Path

import numpy as np
import pandas as pd

from skindiff.core.seeding import derived_seed
from skindiff.data.fitzpatrick import DARK_FST, LIGHT_FST
from skindiff.data.images import load_rgb
from skindiff.data.skin_tone import ita_category, measured_ita
from skindiff.diffusion.config import GenerateConfig

UNMEASURED = "unmeasured"  # the ita_category of an image with too little skin


def target_ita_range(fst: int, config: GenerateConfig) -> tuple[float, float]:
    """The ITA range (low, high] on target for an image of Fitzpatrick type `fst`."""
    if fst in DARK_FST:
        return -math.inf, config.dark_ita_max
    if fst in LIGHT_FST:
        return config.light_ita_min, math.inf
    return config.dark_ita_max, config.light_ita_min


def measure_synthetic(rows: pd.DataFrame, out_dir: Path, config: GenerateConfig) -> pd.DataFrame:
    """`rows` (plan rows, `path` relative to `out_dir`) with `ita`, `ita_category` and
    `on_target` of their images."""
    itas = [measured_ita(load_rgb(Path(out_dir) / path)) for path in rows["path"]]
    on_target = []
    for ita, fst in zip(itas, rows["fitzpatrick_scale"], strict=True):
        low, high = target_ita_range(int(fst), config)
        on_target.append(bool(low < ita <= high))  # False for NaN
    return rows.assign(
        ita=np.round(itas, 2),
        ita_category=[UNMEASURED if np.isnan(v) else ita_category(v) for v in itas],
        on_target=on_target,
    )


def replacements(off_target: pd.DataFrame, attempt: int) -> pd.DataFrame:
    """Plan rows that replace `off_target` rows at `attempt` (1, 2, ...): new seeds, new
    files, the same index."""
    seeds = [derived_seed("skin-tone-retry", int(seed), attempt) for seed in off_target["seed"]]
    paths = [
        str(Path(path).parent / f"{md5hash}-{index}-r{attempt}{Path(path).suffix}")
        for path, md5hash, index in zip(
            off_target["path"], off_target["md5hash"], off_target["index"], strict=True
        )
    ]
    return off_target.assign(seed=seeds, path=paths, attempt=attempt)


def with_source_itas(train: pd.DataFrame) -> pd.DataFrame:
    """`train` with the ITA of each image as numbers: prepare's `ita` column, else measured
    now."""
    if "ita" in train.columns:
        return train.assign(ita=pd.to_numeric(train["ita"], errors="coerce"))
    return train.assign(ita=[measured_ita(load_rgb(Path(p))) for p in train["path"]])


def skin_tone_metrics(sources: pd.DataFrame, manifest: pd.DataFrame) -> dict[str, float]:
    """What a generate run made, by skin tone: `ita_median_source_<group>` of the training
    images (`sources`, see `with_source_itas`), `ita_median_synthetic` and
    `ita_median_synthetic_fst<k>` per target type, and the shares of synthetic images
    `on_target_fraction`, `on_target_first_try_fraction` (before any replacement),
    `kept_fraction` and `unmeasured_fraction`."""
    metrics = {
        f"ita_median_source_{group}": rows["ita"].median()
        for group, rows in sources.groupby("group")
    }
    metrics["ita_median_synthetic"] = manifest["ita"].median()
    metrics |= {
        f"ita_median_synthetic_fst{fst}": rows["ita"].median()
        for fst, rows in manifest.groupby("fitzpatrick_scale")
    }
    on_target = manifest["on_target"].astype(bool)
    metrics |= {
        "on_target_fraction": on_target.mean(),
        "on_target_first_try_fraction": (on_target & (manifest["attempt"] == 0)).mean(),
        "kept_fraction": manifest["kept"].astype(bool).mean(),
        "unmeasured_fraction": (manifest["ita_category"] == UNMEASURED).mean(),
    }
    return {name: float(value) for name, value in metrics.items() if pd.notna(value)}
