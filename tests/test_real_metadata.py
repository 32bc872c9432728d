"""The real Fitzpatrick17k metadata reproduces the paper's Table 1 and scenario sizes.

Metadata only: the images are not available here, so no image is touched.
"""

import pandas as pd
import pytest

from conftest import REAL_METADATA
from skindiff.data.cohort import CohortSpec, count_table, select_cohort
from skindiff.data.fitzpatrick import CONDITIONS, PAPER_SEEDS
from skindiff.data.metadata import read_metadata
from skindiff.data.splits import build_scenario_splits

pytestmark = pytest.mark.skipif(
    not REAL_METADATA.is_file(), reason=f"real metadata not present at {REAL_METADATA}"
)

# The paper's Table 1 (rows FST 1, 2, 5, 6; columns in CONDITIONS order).
PAPER_TABLE_1 = {
    1: [85, 30, 15, 70, 7, 113, 100],
    2: [156, 97, 56, 115, 28, 232, 180],
    5: [24, 31, 32, 31, 29, 64, 40],
    6: [7, 9, 12, 15, 9, 21, 23],
}
# (train, test) per scenario with val_fraction = 0, from the paper's text and tables.
PAPER_SIZES = {"i": (1519, 56), "ii": (1284, 291), "iii": (1228, 291)}


@pytest.fixture(scope="module")
def cohort() -> pd.DataFrame:
    return select_cohort(read_metadata(REAL_METADATA), CohortSpec())


def test_metadata_reads_all_rows() -> None:
    assert len(read_metadata(REAL_METADATA)) == 16577


def test_table_1_cell_by_cell(cohort: pd.DataFrame) -> None:
    table = count_table(cohort, CONDITIONS)
    for fst, row in PAPER_TABLE_1.items():
        assert table.loc[str(fst), list(CONDITIONS)].tolist() == row, f"FST {fst}"
    assert table.loc["total", "total"] == 1631


@pytest.mark.parametrize("scenario", ["i", "ii", "iii"])
@pytest.mark.parametrize("seed", PAPER_SEEDS)
def test_scenario_sizes_match_paper(cohort: pd.DataFrame, scenario: str, seed: int) -> None:
    splits = build_scenario_splits(cohort, scenario, seed, val_fraction=0)
    assert (len(splits.train), len(splits.test)) == PAPER_SIZES[scenario]
    assert splits.val.empty
    assert len(splits.flexible_light) == 56


@pytest.mark.parametrize("scenario", ["i", "ii", "iii"])
def test_validation_is_carved_from_train(cohort: pd.DataFrame, scenario: str) -> None:
    splits = build_scenario_splits(cohort, scenario, 42, val_fraction=0.1)
    train, test = PAPER_SIZES[scenario]
    assert len(splits.train) + len(splits.val) == train
    assert len(splits.test) == test
    assert abs(len(splits.val) - 0.1 * train) <= 14  # one rounding per (condition, group) stratum


def test_scenario_groups(cohort: pd.DataFrame) -> None:
    i, ii, iii = (build_scenario_splits(cohort, s, 0, val_fraction=0) for s in ("i", "ii", "iii"))
    assert set(i.test["group"]) == {"dark"} and set(ii.test["group"]) == {"dark"}
    assert set(iii.train["group"]) == {"light"}
    assert (ii.train["group"] == "dark").sum() == 56
    # ii trains on exactly the dark images i tests on; iii tests on those ii tests on
    assert set(ii.train.query("group == 'dark'")["md5hash"]) == set(i.test["md5hash"])
    assert set(iii.test["md5hash"]) == set(ii.test["md5hash"])
    assert i.test.groupby("label").size().tolist() == [8] * 7
