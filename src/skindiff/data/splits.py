"""Flexible subsets and the paper's three scenarios, plus a validation split carved from train.

| scenario | train                                   | test                   |
|----------|-----------------------------------------|------------------------|
| i        | non-flexible light + non-flexible dark  | dark flexible subset   |
| ii       | non-flexible light + dark flexible      | non-flexible dark      |
| iii      | non-flexible light                      | non-flexible dark      |

The light flexible subset is in no split; the ablation (Table 5) tests on it.

`exclude_test_of` leaves other scenarios' test images (same seed) out of train and validation:
scenario i without those of ii and iii trains on the non-flexible light images only, so that
`tune` uses none of the images ii and iii are tested on.
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd

from skindiff.core.manifest import SPLIT_COLUMNS
from skindiff.core.settings import coerce
from skindiff.data.cohort import DARK, LIGHT
from skindiff.data.config import Scenario, check_exclusion
from skindiff.data.fitzpatrick import FLEXIBLE_PER_CONDITION
from skindiff.errors import DataValidationError

SPLIT_NAMES = ("train", "val", "test", "flexible_light")
# The images each scenario trains on, by their Scenario.test_images names (see the table).
TRAIN_IMAGES = {
    Scenario.I: ("non-flexible light", "non-flexible dark"),
    Scenario.II: ("non-flexible light", "dark flexible subset"),
    Scenario.III: ("non-flexible light",),
}


@dataclass(frozen=True)
class ScenarioSplits:
    """Disjoint image sets of one scenario and seed, each a frame of cohort rows."""

    scenario: Scenario
    seed: int
    exclude_test_of: tuple[Scenario, ...]
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    flexible_light: pd.DataFrame

    def manifest(self, split: str) -> pd.DataFrame:
        """One split as a manifest: the SPLIT_COLUMNS first, any other cohort columns after."""
        frame = getattr(self, split).assign(split=split)
        extra = [c for c in frame.columns if c not in SPLIT_COLUMNS]
        return frame[[*SPLIT_COLUMNS, *extra]].reset_index(drop=True)


def sample_flexible(
    cohort: pd.DataFrame, group: str, seed: int, per_condition: int
) -> pd.DataFrame:
    """`per_condition` images per condition drawn from one skin-type group (reference protocol)."""
    members = cohort[cohort["group"] == group]
    sizes = members.groupby("label").size().reindex(sorted(cohort["label"].unique()), fill_value=0)
    short = sizes[sizes < per_condition]
    if len(short):
        listing = ", ".join(f"{label!r} has {n}" for label, n in short.items())
        raise DataValidationError(
            f"the {group} flexible subset needs {per_condition} images per condition, but {listing}"
        )
    return members.groupby("label").sample(n=per_condition, random_state=seed)


def carve_validation(
    train: pd.DataFrame, val_fraction: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, val): `val_fraction` of each (label, group) stratum, rounded, goes to val."""
    if not 0 <= val_fraction < 1:
        raise DataValidationError(f"val_fraction must be in [0, 1), got {val_fraction}")
    # A separate stream from the flexible sampling, so changing val_fraction keeps the subsets.
    rng = np.random.default_rng([seed, 1])
    val_index: list = []
    for _, stratum in train.groupby(["label", "group"], sort=True):
        n_val = int(np.floor(val_fraction * len(stratum) + 0.5))
        val_index.extend(rng.permutation(stratum.index.to_numpy())[:n_val])
    is_val = train.index.isin(val_index)
    return train.loc[~is_val], train.loc[is_val]


def build_scenario_splits(
    cohort: pd.DataFrame,
    scenario: Scenario | str,
    seed: int,
    val_fraction: float = 0.1,
    per_condition: int = FLEXIBLE_PER_CONDITION,
    exclude_test_of: tuple[Scenario | str, ...] | str = (),
) -> ScenarioSplits:
    """The train/val/test sets of a scenario for one repeat seed (see the module docstring);
    the test images of the `exclude_test_of` scenarios are dropped before val is carved."""
    scenario = coerce(Scenario, "scenario", scenario)
    exclude_test_of = coerce(tuple[Scenario, ...], "exclude_test_of", exclude_test_of)
    check_exclusion(scenario, exclude_test_of)
    dark_flexible = sample_flexible(cohort, DARK, seed, per_condition)
    light_flexible = sample_flexible(cohort, LIGHT, seed, per_condition)
    flexible = cohort.index.isin(dark_flexible.index) | cohort.index.isin(light_flexible.index)
    images = {
        "non-flexible light": cohort[~flexible & (cohort["group"] == LIGHT)],
        "non-flexible dark": cohort[~flexible & (cohort["group"] == DARK)],
        "dark flexible subset": dark_flexible,
    }
    excluded = {s.test_images for s in exclude_test_of}
    train = pd.concat([images[k] for k in TRAIN_IMAGES[scenario] if k not in excluded])
    train, val = carve_validation(train.sort_index(), val_fraction, seed)
    return ScenarioSplits(
        scenario=scenario,
        seed=seed,
        exclude_test_of=exclude_test_of,
        train=train,
        val=val,
        test=images[scenario.test_images].sort_index(),
        flexible_light=light_flexible.sort_index(),
    )
