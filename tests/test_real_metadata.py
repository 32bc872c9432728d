"""The real Fitzpatrick17k metadata reproduces the paper's Table 1 and scenario sizes, and the
classifiers train on the paper's training sets.

The images are not available here: the classifier tests use a placeholder image per row.
"""

import time
from dataclasses import replace
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import REAL_METADATA
from skindiff.classify import data as classify_data
from skindiff.classify.config import ClassifierConfig
from skindiff.classify.data import build_training_set
from skindiff.classify.train import train_classifier
from skindiff.data.cohort import CohortSpec, count_table, select_cohort
from skindiff.data.config import Scenario
from skindiff.data.fitzpatrick import CONDITIONS, FLEXIBLE_PER_CONDITION, PAPER_SEEDS
from skindiff.data.metadata import read_metadata
from skindiff.data.near_duplicates import CSV_ROWS
from skindiff.data.prepare import PrepareConfig, prepare_scenario
from skindiff.data.splits import ScenarioSplits, build_scenario_splits
from skindiff.diffusion.config import GenerateConfig, LoraConfig, TextualInversionConfig
from skindiff.errors import SkindiffError
from skindiff.options import StudyConfigs
from skindiff.plans import ReportConfig, StudyPlan, TuneConfig
from skindiff.quality.reference import REFERENCE_SCENARIO, reference_images
from skindiff.tracking.frozen import tuning_overlap
from skindiff.tracking.lora import run_lora
from skindiff.tracking.pipeline import run_main
from skindiff.tracking.report import run_report
from skindiff.tracking.textual_inversion import run_textual_inversion
from skindiff.tracking.tune import run_tune_seeds

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
        near_duplicates="off",  # identical placeholders: test_identical_placeholders_... below
    )
    return prepare_scenario(config).splits


def test_identical_placeholders_are_one_cluster_counted_in_full_and_capped(
    image_dir: Path, tmp_path: Path
) -> None:
    """Every pair of the 1,631 identical placeholders is a near-duplicate: all 1.3 million are
    counted, the CSV keeps CSV_ROWS of them (those across the train/test boundary first), and
    a warning says the cohort is one cluster."""
    config = PrepareConfig(metadata_csv=str(REAL_METADATA), image_dir=str(image_dir))
    found = prepare_scenario(config).near_duplicates
    metrics = found.metrics()
    assert metrics["n_near_duplicate_pairs"] == 1631 * 1630 // 2
    # scenario i: each of the 56 test images pairs with each of the 1,519 training images
    assert metrics["n_near_duplicate_pairs_across_train_test"] == 56 * 1519
    assert metrics["n_test_images_with_training_copy"] == 56
    assert found.largest_cluster == 1631
    table = found.table()
    assert len(table) == CSV_ROWS
    assert set(table.split_a) | set(table.split_b) >= {"test", "train"}
    warnings = " ".join(found.warnings())
    assert f"{1631 * 1630 // 2} pairs counted" in warnings
    assert "one cluster of near-duplicates (1631 of 1631 images)" in warnings


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


def test_one_tune_seed_scores_the_test_images_of_every_other_seed(cohort: pd.DataFrame) -> None:
    """Tuned on seed 0 by tune's default protocol, the objective is scored on the dark
    flexible subset of seed 0: none of seed 0's test images of ii and iii, but about 46 of the
    56 are test images of ii and iii of each other seed. The paper's protocol scores on
    scenario i's validation split, which holds 30 of seed 0's own (CLASSIFIER_SIZES)."""
    pairs = [(scenario, seed) for scenario in ("ii", "iii") for seed in PAPER_SEEDS]
    excluding = PrepareConfig(seed=0, exclude_test_of=("ii", "iii"))
    counts = tuning_overlap(cohort, excluding, pairs, FLEXIBLE_PER_CONDITION)
    counts = counts.set_index(["scenario", "seed"])
    objective = set(build_scenario_splits(cohort, "i", 0).test["md5hash"])
    for scenario, seed in pairs:
        test = set(build_scenario_splits(cohort, scenario, seed).test["md5hash"])
        row = counts.loc[(scenario, seed)]
        assert row.n_test == len(test) == PAPER_SIZES[scenario][1]
        assert row.n_scored_by_tuning == len(objective & test) and row.tune_seed == 0
    own = counts.loc[[("ii", 0), ("iii", 0)], "n_scored_by_tuning"]
    others = counts.drop(index=[("ii", 0), ("iii", 0)])["n_scored_by_tuning"]
    assert list(own) == [0, 0]
    assert others.between(40, 52).all() and abs(others.mean() - 46) < 2

    paper = tuning_overlap(cohort, PrepareConfig(seed=0), pairs, FLEXIBLE_PER_CONDITION)
    paper = paper.set_index(["scenario", "seed"])["n_scored_by_tuning"]
    assert paper[("ii", 0)] == paper[("iii", 0)] == CLASSIFIER_SIZES[(0.1, "i")][1][1]
    assert (paper.drop(index=[("ii", 0), ("iii", 0)]) > 0).all()


TUNE_CONDITIONS = ("folliculitis", "psoriasis")  # two of the seven: a smaller cohort to tune on


def logged_md5s(run_id: str, artifact: str, dst: Path) -> set[str]:
    path = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=artifact, dst_path=str(dst / run_id)
    )
    return set(pd.read_csv(path, dtype={"md5hash": str})["md5hash"])


@pytest.mark.slow
def test_tune_per_seed_gives_main_each_seeds_own_settings(
    tracking: str, image_dir: Path, tmp_path: Path
) -> None:
    """`tune --seeds 0,42` on the real metadata (placeholder images, a few steps of
    everything): each seed's trial scores no test image of that seed's ii and iii and its
    generator is registered tagged with its seed; `main` gives each seed its own settings,
    refuses a seed without, falls back when told, and counts the test images that scored the
    objective (none for a seed's own; those of another seed's objective otherwise), which the
    report states."""
    cohort = select_cohort(read_metadata(REAL_METADATA), CohortSpec(TUNE_CONDITIONS))
    small = {"base_model": "tiny-random", "resolution": 32}
    data = PrepareConfig(
        metadata_csv=str(REAL_METADATA),
        image_dir=str(image_dir),
        conditions=TUNE_CONDITIONS,
        exclude_test_of=("ii", "iii"),
    )
    configs = StudyConfigs(
        data,
        TextualInversionConfig(
            conditions=TUNE_CONDITIONS,
            max_train_steps=1,
            train_batch_size=2,
            gradient_accumulation_steps=1,
            **small,
        ),
        LoraConfig(max_train_steps=1, train_batch_size=2, **small),
        GenerateConfig(num_per_image=1, num_inference_steps=2, output_size=32, **small),
        ClassifierConfig(arch="tiny", epochs=1, batch_size=64, image_size=32),
    )
    space = tmp_path / "space.yaml"
    space.write_text("strength: {low: 0.5, high: 0.6}\n")
    model = f"tune-seeds-{time.time_ns()}"
    config = TuneConfig(
        n_trials=1,
        seeds=(0, 42),
        storage=f"sqlite:///{tmp_path / 'optuna.db'}",
        registered_model=model,
        search_space=str(space),
    )
    call = run_tune_seeds(configs, config)

    client = mlflow.MlflowClient()
    for seed, result in call.by_seed.items():
        (trial,) = optuna.load_study(
            study_name=f"skindiff-tune-seed-{seed}", storage=config.storage
        ).trials
        classifier = trial.user_attrs["classifier_run_id"]
        scored = logged_md5s(classifier, "predictions/test.csv", tmp_path)
        validated = logged_md5s(classifier, "predictions/val.csv", tmp_path)
        tested = set(build_scenario_splits(cohort, "ii", seed).test["md5hash"])
        tested |= set(build_scenario_splits(cohort, "iii", seed).test["md5hash"])
        assert scored == set(build_scenario_splits(cohort, "i", seed).test["md5hash"])
        assert validated and not (scored | validated) & tested
        version = client.get_model_version(model, result.registered_version)
        assert version.tags["tune_seed"] == str(seed) and result.seed == seed
        assert mlflow.get_run(result.run_id).data.tags["mlflow.parentRunId"] == call.run_id
    frozen = {seed: result.frozen_params for seed, result in call.by_seed.items()}
    assert frozen[0] != frozen[42]  # so that the mapping below is seen
    local = mlflow.artifacts.download_artifacts(call.frozen_params_uri, dst_path=str(tmp_path))
    assert yaml.safe_load(Path(local).read_text()) == frozen

    # main: each seed its own settings, none of its test images scored the objective.
    pair_configs = replace(configs, data=replace(data, exclude_test_of=()))
    plan = StudyPlan(["ii"], [0, 42], ["tiny"], ["real"], call.run_id)
    runs = run_main(plan, pair_configs)
    for seed in (0, 42):
        pair = mlflow.get_run(runs[("ii", seed)].parent).data
        assert {f"frozen.{n}": v for n, v in frozen[seed].items()}.items() <= pair.params.items()
        assert pair.params["frozen_params_seed"] == str(seed)
        assert pair.metrics["n_test_images_scored_by_tuning"] == 0

    made = len(mlflow.search_runs([tracking], output_format="list"))
    with pytest.raises(SkindiffError, match=r"tuned per seed \(0,42\) and have none for seed 123"):
        run_main(replace(plan, seeds=(0, 42, 123)), pair_configs)
    assert len(mlflow.search_runs([tracking], output_format="list")) == made

    def scored_by(tune_seed: int, seed: int) -> int:
        tuned_on = replace(data, seed=tune_seed)
        counts = tuning_overlap(cohort, tuned_on, [("ii", seed)], FLEXIBLE_PER_CONDITION)
        return int(counts["n_scored_by_tuning"].iloc[0])

    fallback = run_main(replace(plan, seeds=(0, 123), frozen_fallback_seed=42), pair_configs)
    pair = mlflow.get_run(fallback[("ii", 123)].parent).data
    assert {f"frozen.{n}": v for n, v in frozen[42].items()}.items() <= pair.params.items()
    assert pair.params["frozen_params_seed"] == "42"
    assert pair.metrics["n_test_images_scored_by_tuning"] == scored_by(42, 123) > 0

    # One tune seed for all (a seed's own run, as a plain tune run): the other seed's test
    # images that scored its objective are counted, logged and stated by the report.
    single = run_main(replace(plan, frozen_params=call.by_seed[0].run_id), pair_configs)
    n_test = len(build_scenario_splits(cohort, "ii", 42).test)
    assert scored_by(0, 42) > 0
    for seed, expected in ((0, 0), (42, scored_by(0, 42))):
        pair = mlflow.get_run(single[("ii", seed)].parent).data
        assert pair.params["frozen_params_seed"] == "0"
        assert pair.metrics["n_test_images_scored_by_tuning"] == expected
    top = mlflow.get_run(mlflow.get_run(single[("ii", 0)].parent).data.tags["mlflow.parentRunId"])
    local = mlflow.artifacts.download_artifacts(
        run_id=top.info.run_id, artifact_path="tuning_overlap.csv", dst_path=str(tmp_path / "top")
    )
    assert pd.read_csv(local).to_dict("records") == [
        {"scenario": "ii", "seed": 0, "tune_seed": 0, "n_test": n_test, "n_scored_by_tuning": 0},
        {
            "scenario": "ii",
            "seed": 42,
            "tune_seed": 0,
            "n_test": n_test,
            "n_scored_by_tuning": scored_by(0, 42),
        },
    ]
    run_report(ReportConfig(tracking, str(tmp_path / "report")))
    report = (tmp_path / "report" / "report.md").read_text()
    assert (
        f"scenario ii seed 42: {scored_by(0, 42)} of its {n_test} test images scored the "
        "tuning objective (settings tuned on seed 0)"
    ) in report
    assert f"scenario ii seed 123: {scored_by(42, 123)} of its {n_test} test images" in report
    assert "Each seed's settings were tuned without its own test images of scenarios ii" in report


@pytest.mark.slow
@pytest.mark.parametrize(("images", "expected"), [("train+val", (1284, 56)), ("train", (1154, 49))])
def test_scenario_ii_generator_trains_on_every_dark_flexible_image(
    image_dir: Path, tracking: str, images: str, expected: tuple[int, int]
) -> None:
    """By default Textual Inversion and LoRA see the whole training set (the 56 dark flexible
    images of scenario ii among them); `generator_images train` leaves the validation split out."""
    data = PrepareConfig(
        metadata_csv=str(REAL_METADATA), image_dir=str(image_dir), scenario="ii", val_fraction=0.1
    )
    ti = TextualInversionConfig(
        base_model="tiny-random",
        max_train_steps=1,
        per_token=False,
        train_batch_size=1,
        gradient_accumulation_steps=1,
        generator_images=images,
    )
    lora = LoraConfig(
        base_model="tiny-random", max_train_steps=1, train_batch_size=1, generator_images=images
    )
    ti_run = run_textual_inversion(data, ti)
    lora_run = run_lora(data, lora, ti_run_id=ti_run)
    for run_id in (ti_run, lora_run):
        metrics = mlflow.get_run(run_id).data.metrics
        counted = (metrics["n_training_images"], metrics["n_training_images_dark"])
        assert counted == expected, run_id


@pytest.mark.parametrize("seed", PAPER_SEEDS)
def test_the_quality_reference_set_never_holds_a_test_image(cohort: pd.DataFrame, seed: int):
    for scenario in Scenario:
        source = build_scenario_splits(cohort, REFERENCE_SCENARIO[scenario], seed)
        reference = reference_images(source.train, source.val)
        test = build_scenario_splits(cohort, scenario, seed).test
        assert set(reference["fitzpatrick_scale"]) <= {5, 6}
        assert not set(reference["md5hash"]) & set(test["md5hash"])
        # i: its 291 non-flexible dark images; ii and iii: the 56 dark flexible ones
        assert len(reference) == (291 if scenario == Scenario.I else 56)
