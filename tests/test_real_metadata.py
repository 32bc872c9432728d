"""The real Fitzpatrick17k metadata reproduces the paper's Table 1 and scenario sizes, and the
classifiers train on the paper's training sets.

The images are not available here: the classifier tests use a placeholder image per row.
"""

from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from conftest import REAL_METADATA
from skindiff.classify import data as classify_data
from skindiff.classify.config import ClassifierConfig
from skindiff.classify.data import build_training_set
from skindiff.classify.train import train_classifier
from skindiff.data.cohort import CohortSpec, count_table, select_cohort
from skindiff.data.fitzpatrick import CONDITIONS, PAPER_SEEDS
from skindiff.data.metadata import read_metadata
from skindiff.data.prepare import PrepareConfig, prepare_scenario
from skindiff.data.splits import ScenarioSplits, build_scenario_splits

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
# What a classifier trains and is validated on: ((train images, dark ones), (val images, dark
# ones)) per (val_fraction, scenario), the same for every paper seed (the strata sizes do not
# depend on the draw). With 0.1, scenario ii keeps 49 of its 56 dark flexible images in train.
CLASSIFIER_SIZES = {
    (0.0, "i"): ((PAPER_SIZES["i"][0], 291), (0, 0)),
    (0.0, "ii"): ((PAPER_SIZES["ii"][0], 56), (0, 0)),
    (0.0, "iii"): ((PAPER_SIZES["iii"][0], 0), (0, 0)),
    (0.1, "i"): ((1366, 261), (153, 30)),
    (0.1, "ii"): ((1154, 49), (130, 7)),
    (0.1, "iii"): ((1105, 0), (123, 0)),
}


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


@pytest.fixture(scope="module")
def image_dir(cohort: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A placeholder JPEG for every cohort row, where the real images would be."""
    folder = tmp_path_factory.mktemp("placeholder-images")
    image = Image.new("RGB", (8, 8), (190, 140, 120))
    for path in cohort["path"]:
        image.save(folder / path)
    return folder


def prepared(image_dir: Path, scenario: str, seed: int, val_fraction: float) -> ScenarioSplits:
    config = PrepareConfig(
        metadata_csv=str(REAL_METADATA),
        image_dir=str(image_dir),
        scenario=scenario,
        seed=seed,
        val_fraction=val_fraction,
    )
    return prepare_scenario(config).splits


def dark_count(rows: pd.DataFrame) -> tuple[int, int]:
    return len(rows), int((rows["group"] == "dark").sum())


@pytest.mark.parametrize("val_fraction", [0.0, 0.1])
@pytest.mark.parametrize("scenario", ["i", "ii", "iii"])
def test_classifier_training_sets(image_dir: Path, scenario: str, val_fraction: float) -> None:
    for seed in PAPER_SEEDS:
        splits = prepared(image_dir, scenario, seed, val_fraction)
        train = build_training_set(splits.train, None, "real")
        sizes = (dark_count(train), dark_count(splits.val))
        assert sizes == CLASSIFIER_SIZES[(val_fraction, scenario)], f"seed {seed}"
        assert len(splits.test) == PAPER_SIZES[scenario][1]


def test_selection_last_trains_on_the_papers_full_training_set(
    image_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    splits = prepared(image_dir, "i", 0, 0.0)
    loaded, load = [], classify_data.load_rgb
    monkeypatch.setattr(
        classify_data, "load_rgb", lambda path: loaded.append(str(path)) or load(path)
    )
    config = ClassifierConfig(epochs=1, batch_size=512, image_size=32, selection="last")
    result = train_classifier(
        config, splits.train, splits.val, splits.test, CohortSpec().labels, progress=False
    )
    assert result.best_epoch == 1 and result.val_predictions is None
    assert len(result.test_predictions) == PAPER_SIZES["i"][1]
    # Every training image is decoded once (all of the training set), and each test image once.
    train_paths = set(splits.train["path"])
    drawn = [path for path in loaded if path in train_paths]
    assert len(drawn) == len(loaded) - PAPER_SIZES["i"][1] == PAPER_SIZES["i"][0]
