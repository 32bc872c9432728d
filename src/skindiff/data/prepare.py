"""The `prepare` stage: metadata + images -> validated cohort -> scenario split manifests."""

import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from skindiff.data.cohort import check_label_names, count_table, select_cohort
from skindiff.data.config import CohortSpec, NearDuplicates, PrepareConfig
from skindiff.data.demo import default_demo_dataset
from skindiff.data.image_signatures import image_signatures
from skindiff.data.images import check_images
from skindiff.data.metadata import read_metadata
from skindiff.data.near_duplicates import (
    NO_SPLIT,
    DuplicateRule,
    NearDuplicateReport,
    find_near_duplicates,
)
from skindiff.data.skin_tone import ita_by_skin_type
from skindiff.data.splits import SPLIT_NAMES, ScenarioSplits, build_scenario_splits
from skindiff.errors import DataValidationError

SKIN_TONE_FILE = "skin_tone.csv"
NEAR_DUPLICATES_FILE = "near_duplicates.csv"
NEAR_DUPLICATES_FIGURE = "near_duplicates.png"


@dataclass(frozen=True)
class DatasetSource:
    metadata_csv: Path
    image_dir: Path
    is_demo: bool


@dataclass(frozen=True)
class PreparedScenario:
    """A scenario's splits plus what is needed to describe and trace them."""

    source: DatasetSource
    spec: CohortSpec
    splits: ScenarioSplits
    dropped: pd.DataFrame = field(repr=False)  # rows skipped for missing/corrupt images
    # None with near_duplicates off; found before `drop` took the training copies out
    near_duplicates: NearDuplicateReport | None = field(default=None, repr=False)


def resolve_dataset(config: PrepareConfig) -> DatasetSource:
    """The dataset to use: the given files, or the embedded demo dataset (PrepareConfig checks
    that both paths or neither are given, and that given ones can be read)."""
    if config.metadata_csv is None or config.image_dir is None:
        demo = default_demo_dataset()
        return DatasetSource(demo.metadata_csv, demo.image_dir, is_demo=True)
    return DatasetSource(
        Path(config.metadata_csv).expanduser(), Path(config.image_dir).expanduser(), False
    )


def source_fingerprint(source: DatasetSource) -> str:
    """Cheap identity of a dataset on disk: the CSV's bytes and the image folder's listing
    (names, sizes, modification times). Content digests come later, from the image check."""
    digest = hashlib.sha256(Path(source.metadata_csv).read_bytes())
    with os.scandir(source.image_dir) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            try:
                stat = entry.stat()
                listed = f"{stat.st_size}\t{stat.st_mtime_ns}"
            except OSError:
                # A dangling or looping link: the image check names the row it breaks.
                listed = "unreadable"
            digest.update(f"{entry.name}\t{listed}\n".encode())
    return digest.hexdigest()


def prepare_scenario(config: PrepareConfig) -> PreparedScenario:
    """Validates the dataset, selects the cohort, builds the scenario's splits and looks for
    near-duplicate images in the cohort (with `near_duplicates drop`, leaving the training
    copies of test images out of train and validation)."""
    source = resolve_dataset(config)
    spec = config.cohort
    cohort = select_cohort(read_metadata(source.metadata_csv), spec)
    check_label_names(cohort, source.metadata_csv)
    checked = check_images(cohort, source.image_dir, skip_missing=config.skip_missing)
    try:
        splits = build_scenario_splits(
            checked.rows,
            config.scenario,
            config.seed,
            val_fraction=config.val_fraction,
            per_condition=config.flexible_per_condition,
            exclude_test_of=config.exclude_test_of,
        )
    except DataValidationError as error:
        raise DataValidationError(f"{source.metadata_csv}: {error}") from None
    if config.near_duplicates == NearDuplicates.OFF:
        return PreparedScenario(source, spec, splits, checked.dropped)
    found = cohort_near_duplicates(checked.rows, splits, DuplicateRule.of(config))
    if config.near_duplicates == NearDuplicates.DROP:
        copies = found.training_copies
        splits = replace(
            splits,
            train=splits.train[~splits.train["md5hash"].isin(copies)],
            val=splits.val[~splits.val["md5hash"].isin(copies)],
        )
    return PreparedScenario(source, spec, splits, checked.dropped, found)


def cohort_near_duplicates(
    cohort: pd.DataFrame, splits: ScenarioSplits, rule: DuplicateRule
) -> NearDuplicateReport:
    """The near-duplicate pairs of the cohort's images, each with its split in `splits`."""
    split_of = {md5: split for split in SPLIT_NAMES for md5 in getattr(splits, split)["md5hash"]}
    rows = cohort.assign(split=cohort["md5hash"].map(split_of).fillna(NO_SPLIT))
    hashes, views = image_signatures(rows, rule.features)
    return find_near_duplicates(rows, hashes, views, rule)


def split_counts(prepared: PreparedScenario) -> pd.DataFrame:
    """Long table: split, fitzpatrick_scale, group, label, count (zeros included)."""
    parts = []
    for split in SPLIT_NAMES:
        frame = getattr(prepared.splits, split)
        counts = frame.groupby(["fitzpatrick_scale", "group", "label"]).size()
        parts.append(counts.rename("count").reset_index().assign(split=split))
    long = pd.concat(parts, ignore_index=True)
    return long[["split", "fitzpatrick_scale", "group", "label", "count"]]


def scenario_rows(prepared: PreparedScenario) -> pd.DataFrame:
    """The rows of all splits of the scenario, with their `split`."""
    return pd.concat([prepared.splits.manifest(split) for split in SPLIT_NAMES], ignore_index=True)


def write_prepared(prepared: PreparedScenario, out_dir: Path) -> Path:
    """Writes `splits/` (one manifest per split, count tables, the skin tone (ITA) per
    Fitzpatrick type, dropped images) under `out_dir`."""
    folder = Path(out_dir) / "splits"
    folder.mkdir(parents=True, exist_ok=True)
    for split in SPLIT_NAMES:
        prepared.splits.manifest(split).to_csv(folder / f"{split}.csv", index=False)
    split_counts(prepared).to_csv(folder / "counts.csv", index=False)
    ita_by_skin_type(scenario_rows(prepared)).to_csv(folder / SKIN_TONE_FILE, index=False)
    splits = prepared.splits
    excluded = (
        f", without the test images of {', '.join(splits.exclude_test_of)}"
        if splits.exclude_test_of
        else ""
    )
    sections = [
        f"# Scenario {splits.scenario}, seed {splits.seed}{excluded}\n\n"
        f"Images per Fitzpatrick skin type and condition (cf. the paper's Table 1).\n"
    ]
    for split in SPLIT_NAMES:
        frame = getattr(prepared.splits, split)
        table = count_table(frame, prepared.spec.labels)
        sections.append(f"## {split} ({len(frame)} images)\n\n{table.to_markdown()}\n")
    (folder / "counts.md").write_text("\n".join(sections))
    if len(prepared.dropped):
        prepared.dropped.to_csv(folder / "dropped_images.csv", index=False)
    if prepared.near_duplicates is not None:
        prepared.near_duplicates.table().to_csv(folder / NEAR_DUPLICATES_FILE, index=False)
        figure = prepared.near_duplicates.figure()
        if figure is not None:
            figure.savefig(folder / NEAR_DUPLICATES_FIGURE, dpi=100)
    return folder
