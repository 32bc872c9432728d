"""The `prepare` stage: metadata + images -> validated cohort -> scenario split manifests."""

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from skindiff.data.cohort import CohortSpec, count_table, select_cohort
from skindiff.data.demo import default_demo_dataset
from skindiff.data.fitzpatrick import CONDITIONS, DARK_FST, FLEXIBLE_PER_CONDITION, LIGHT_FST
from skindiff.data.images import check_images
from skindiff.data.metadata import read_metadata
from skindiff.data.splits import SPLIT_NAMES, ScenarioSplits, build_scenario_splits
from skindiff.errors import DataValidationError


@dataclass(frozen=True)
class PrepareConfig:
    """Inputs of the `prepare` stage. Empty `metadata_csv` and `image_dir` = the demo dataset."""

    metadata_csv: str = ""
    image_dir: str = ""
    scenario: str = "i"
    seed: int = 0
    val_fraction: float = 0.1
    conditions: tuple[str, ...] = CONDITIONS
    light_fst: tuple[int, ...] = LIGHT_FST
    dark_fst: tuple[int, ...] = DARK_FST
    flexible_per_condition: int = FLEXIBLE_PER_CONDITION
    skip_missing: bool = False


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


def resolve_dataset(metadata_csv: str, image_dir: str) -> DatasetSource:
    """The dataset to use: both paths given, or neither (= the embedded demo dataset)."""
    if not metadata_csv and not image_dir:
        demo = default_demo_dataset()
        return DatasetSource(demo.metadata_csv, demo.image_dir, is_demo=True)
    if not metadata_csv or not image_dir:
        missing = "metadata_csv" if not metadata_csv else "image_dir"
        raise DataValidationError(
            f"{missing} is empty: give both metadata_csv and image_dir, "
            "or neither for the demo data"
        )
    return DatasetSource(Path(metadata_csv).expanduser(), Path(image_dir).expanduser(), False)


def source_fingerprint(source: DatasetSource) -> str:
    """Cheap identity of a dataset on disk: the CSV's bytes and the image folder's listing
    (names, sizes, modification times). Content digests come later, from the image check."""
    digest = hashlib.sha256(Path(source.metadata_csv).read_bytes())
    with os.scandir(source.image_dir) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            stat = entry.stat()
            digest.update(f"{entry.name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def prepare_scenario(config: PrepareConfig) -> PreparedScenario:
    """Validates the dataset, selects the cohort and builds the scenario's splits."""
    source = resolve_dataset(config.metadata_csv, config.image_dir)
    spec = CohortSpec(tuple(config.conditions), tuple(config.light_fst), tuple(config.dark_fst))
    if config.flexible_per_condition < 1:
        raise DataValidationError(
            f"flexible_per_condition must be at least 1, got {config.flexible_per_condition}"
        )
    cohort = select_cohort(read_metadata(source.metadata_csv), spec)
    checked = check_images(cohort, source.image_dir, skip_missing=config.skip_missing)
    splits = build_scenario_splits(
        checked.rows,
        config.scenario,
        config.seed,
        val_fraction=config.val_fraction,
        per_condition=config.flexible_per_condition,
    )
    return PreparedScenario(source=source, spec=spec, splits=splits, dropped=checked.dropped)


def content_digest(frame: pd.DataFrame) -> str:
    """Digest of a set of images by content and annotation, independent of row order and paths."""
    rows = sorted(
        f"{m}\t{label}\t{fst}\t{sha}"
        for m, label, fst, sha in zip(
            frame["md5hash"],
            frame["label"],
            frame["fitzpatrick_scale"],
            frame["sha256"],
            strict=True,
        )
    )
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def split_counts(prepared: PreparedScenario) -> pd.DataFrame:
    """Long table: split, fitzpatrick_scale, group, label, count (zeros included)."""
    parts = []
    for split in SPLIT_NAMES:
        frame = getattr(prepared.splits, split)
        counts = frame.groupby(["fitzpatrick_scale", "group", "label"]).size()
        parts.append(counts.rename("count").reset_index().assign(split=split))
    long = pd.concat(parts, ignore_index=True)
    return long[["split", "fitzpatrick_scale", "group", "label", "count"]]


def slug(text: str) -> str:
    """`basal cell carcinoma` -> `basal_cell_carcinoma`, for names of metrics and files."""
    return re.sub(r"[^0-9a-zA-Z]+", "_", text).strip("_").lower()


def write_prepared(prepared: PreparedScenario, out_dir: Path) -> Path:
    """Writes `splits/` (one manifest per split, count tables, dropped images) under `out_dir`."""
    folder = Path(out_dir) / "splits"
    folder.mkdir(parents=True, exist_ok=True)
    for split in SPLIT_NAMES:
        prepared.splits.manifest(split).to_csv(folder / f"{split}.csv", index=False)
    split_counts(prepared).to_csv(folder / "counts.csv", index=False)
    sections = [
        f"# Scenario {prepared.splits.scenario}, seed {prepared.splits.seed}\n\n"
        f"Images per Fitzpatrick skin type and condition (cf. the paper's Table 1).\n"
    ]
    for split in SPLIT_NAMES:
        frame = getattr(prepared.splits, split)
        table = count_table(frame, prepared.spec.labels)
        sections.append(f"## {split} ({len(frame)} images)\n\n{table.to_markdown()}\n")
    (folder / "counts.md").write_text("\n".join(sections))
    if len(prepared.dropped):
        prepared.dropped.to_csv(folder / "dropped_images.csv", index=False)
    return folder
