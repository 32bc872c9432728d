"""Split properties for several seeds: disjoint, stratified, deterministic, seed-dependent;
scenario i without scenarios ii's and iii's test images (`exclude_test_of`)."""

import numpy as np
import pandas as pd
import pytest

from conftest import REAL_METADATA
from skindiff.data.cohort import CohortSpec, select_cohort
from skindiff.data.config import PrepareConfig
from skindiff.data.metadata import read_metadata
from skindiff.data.splits import SPLIT_NAMES, build_scenario_splits
from skindiff.errors import DataValidationError

SEEDS = [0, 1, 42, 123, 2024]
CONDITIONS = ("c0", "c1", "c2", "c3")


def synthetic_metadata(seed: int = 0) -> pd.DataFrame:
    """Imbalanced metadata (many light, few dark, some FST 3-4 and -1), rows in random order."""
    rng = np.random.default_rng(seed)
    rows = []
    for label in CONDITIONS:
        for fst, n in ((1, 20), (2, 35), (3, 5), (4, 4), (5, 12), (6, 9), (-1, 3)):
            n += int(rng.integers(0, 5))
            rows += [{"label": label, "fitzpatrick_scale": fst} for _ in range(n)]
    frame = pd.DataFrame(rows).sample(frac=1, random_state=seed).reset_index(drop=True)
    frame["md5hash"] = [f"{rng.integers(2**62):016x}{i:04d}" for i in range(len(frame))]
    frame["path"] = frame["md5hash"] + ".jpg"
    return frame


@pytest.fixture(scope="module")
def cohort() -> pd.DataFrame:
    return select_cohort(synthetic_metadata(), CohortSpec(conditions=CONDITIONS))


def md5s(splits, name: str) -> set[str]:
    return set(getattr(splits, name)["md5hash"])


@pytest.mark.parametrize("scenario", ["i", "ii", "iii"])
@pytest.mark.parametrize("seed", SEEDS)
def test_splits_are_disjoint(cohort: pd.DataFrame, scenario: str, seed: int) -> None:
    splits = build_scenario_splits(cohort, scenario, seed, val_fraction=0.2)
    sets = [md5s(splits, name) for name in SPLIT_NAMES]
    assert sum(map(len, sets)) == len(set().union(*sets))
    assert set(cohort["fitzpatrick_scale"]) <= {1, 2, 5, 6}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("fraction", [0.1, 0.25])
def test_validation_is_stratified(cohort: pd.DataFrame, seed: int, fraction: float) -> None:
    splits = build_scenario_splits(cohort, "i", seed, val_fraction=fraction)
    pool = pd.concat([splits.train, splits.val])
    for (label, group), stratum in pool.groupby(["label", "group"]):
        in_val = stratum["md5hash"].isin(splits.val["md5hash"]).sum()
        assert in_val == int(np.floor(fraction * len(stratum) + 0.5)), (label, group)


@pytest.mark.parametrize("seed", SEEDS)
def test_flexible_subsets_are_balanced(cohort: pd.DataFrame, seed: int) -> None:
    splits = build_scenario_splits(cohort, "i", seed)
    assert splits.test.groupby("label").size().to_dict() == dict.fromkeys(CONDITIONS, 8)
    assert set(splits.test["group"]) == {"dark"}
    assert splits.flexible_light.groupby("label").size().to_dict() == dict.fromkeys(CONDITIONS, 8)
    assert set(splits.flexible_light["group"]) == {"light"}


@pytest.mark.parametrize("seed", SEEDS)
def test_same_seed_same_split_whatever_the_row_order(seed: int) -> None:
    metadata = synthetic_metadata()
    shuffled = metadata.sample(frac=1, random_state=seed + 1)
    spec = CohortSpec(conditions=CONDITIONS)
    a = build_scenario_splits(select_cohort(metadata, spec), "ii", seed)
    b = build_scenario_splits(select_cohort(shuffled, spec), "ii", seed)
    for name in SPLIT_NAMES:
        pd.testing.assert_frame_equal(a.manifest(name), b.manifest(name))


def test_different_seeds_give_different_subsets(cohort: pd.DataFrame) -> None:
    tests = {frozenset(md5s(build_scenario_splits(cohort, "i", s), "test")) for s in SEEDS}
    vals = {frozenset(md5s(build_scenario_splits(cohort, "i", s), "val")) for s in SEEDS}
    assert len(tests) == len(SEEDS) and len(vals) == len(SEEDS)


def test_val_fraction_does_not_move_the_subsets(cohort: pd.DataFrame) -> None:
    a = build_scenario_splits(cohort, "ii", 7, val_fraction=0)
    b = build_scenario_splits(cohort, "ii", 7, val_fraction=0.3)
    assert a.val.empty and not b.val.empty
    assert md5s(a, "test") == md5s(b, "test")
    assert md5s(a, "train") == md5s(b, "train") | md5s(b, "val")


def test_manifest_columns(cohort: pd.DataFrame) -> None:
    manifest = build_scenario_splits(cohort, "iii", 0).manifest("val")
    assert list(manifest.columns[:6]) == [
        "md5hash",
        "label",
        "fitzpatrick_scale",
        "group",
        "split",
        "path",
    ]
    assert set(manifest["split"]) == {"val"}


@pytest.fixture(scope="module")
def demo_cohort(demo_dataset) -> pd.DataFrame:
    return select_cohort(read_metadata(demo_dataset.metadata_csv), CohortSpec())


@pytest.fixture(scope="module")
def real_cohort() -> pd.DataFrame:
    if not REAL_METADATA.is_file():
        pytest.skip(f"real metadata not present at {REAL_METADATA}")
    return select_cohort(read_metadata(REAL_METADATA), CohortSpec())


def trained_on(splits) -> set[str]:
    return md5s(splits, "train") | md5s(splits, "val")


@pytest.mark.parametrize("which", ["demo_cohort", "real_cohort"])
@pytest.mark.parametrize("seed", SEEDS)
def test_scenario_i_without_the_test_images_of_ii_and_iii(
    request: pytest.FixtureRequest, which: str, seed: int
) -> None:
    cohort = request.getfixturevalue(which)
    i, ii, iii = (build_scenario_splits(cohort, s, seed) for s in ("i", "ii", "iii"))
    tuned = build_scenario_splits(cohort, "i", seed, exclude_test_of=("ii", "iii"))
    assert not trained_on(tuned) & (md5s(ii, "test") | md5s(iii, "test"))
    assert trained_on(i) - trained_on(tuned) == md5s(ii, "test")
    for name in ("test", "flexible_light"):
        pd.testing.assert_frame_equal(tuned.manifest(name), i.manifest(name))
    # The only dark images left are scenario i's test split: train and val are iii's.
    assert set(tuned.train["group"]) == set(tuned.val["group"]) == {"light"}
    for name in ("train", "val"):
        pd.testing.assert_frame_equal(tuned.manifest(name), iii.manifest(name))


@pytest.mark.parametrize("which", ["demo_cohort", "real_cohort"])
@pytest.mark.parametrize("seed", SEEDS)
def test_the_paper_protocol_keeps_the_table_of_scenarios(
    request: pytest.FixtureRequest, which: str, seed: int
) -> None:
    cohort = request.getfixturevalue(which)
    i, ii, iii = (
        build_scenario_splits(cohort, s, seed, exclude_test_of=()) for s in ("i", "ii", "iii")
    )
    light = set(cohort.query("group == 'light'")["md5hash"]) - md5s(i, "flexible_light")
    dark = set(cohort.query("group == 'dark'")["md5hash"]) - md5s(i, "test")
    assert trained_on(i) == light | dark and md5s(ii, "test") == md5s(iii, "test") == dark
    assert trained_on(ii) == light | md5s(i, "test") and trained_on(iii) == light


@pytest.mark.parametrize(
    ("scenario", "excluded"), [("i", "i"), ("i", "ii,i"), ("ii", "iii"), ("iii", "ii")]
)
def test_a_scenarios_own_test_images_cannot_be_excluded(
    cohort: pd.DataFrame, scenario: str, excluded: str
) -> None:
    message = rf"^exclude_test_of: the test images of {excluded.split(',')[-1]} are scenario "
    with pytest.raises(DataValidationError, match=message):
        build_scenario_splits(cohort, scenario, 0, exclude_test_of=excluded)
    with pytest.raises(DataValidationError, match=message):
        PrepareConfig(scenario=scenario, exclude_test_of=excluded)
