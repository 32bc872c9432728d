"""Settings of the data stages: which dataset, which cohort, which scenario and seed; and how
`download` fetches a dataset's images."""

import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from skindiff.core.settings import Settings, check_seed, setting
from skindiff.data.fitzpatrick import CONDITIONS, DARK_FST, FLEXIBLE_PER_CONDITION, LIGHT_FST
from skindiff.errors import DataValidationError, require


class Scenario(StrEnum):
    """The paper's scenarios (see `data.splits`)."""

    I = "i"  # noqa: E741 - the paper's roman numeral
    II = "ii"
    III = "iii"

    @property
    def test_images(self) -> str:
        """The images this scenario tests on: ii and iii share theirs."""
        return "dark flexible subset" if self is Scenario.I else "non-flexible dark"


class NearDuplicates(StrEnum):
    """What `prepare` does about near-duplicate images in the cohort (see
    `data.near_duplicates`)."""

    REPORT = "report"  # log and warn; the splits stay the paper's
    DROP = "drop"  # train and validation lose every image that near-duplicates a test image
    OFF = "off"  # not looked for


class DuplicateFeatures(StrEnum):
    """The image features near-duplicates are compared in."""

    AUTO = "auto"  # resnet18 where its ImageNet weights file is present, else thumbnails
    RESNET18 = "resnet18"  # ImageNet ResNet-18's pooled features (the weights `weights auto` reads)
    THUMBNAILS = "thumbnails"  # 12 x 12 grey thumbnails of the image and 18 crops of it


def check_exclusion(scenario: Scenario, exclude_test_of: tuple[Scenario, ...]) -> None:
    """Refuses excluding the test images of a scenario that tests on `scenario`'s own."""
    clash = ",".join(s for s in exclude_test_of if s.test_images == scenario.test_images)
    if clash:
        raise DataValidationError(
            f"exclude_test_of: the test images of {clash} are scenario {scenario}'s own test "
            f"split ({scenario.test_images}); leave {clash} out of exclude_test_of"
        )


def check_input_path(name: str, value: str, *, folder: bool) -> None:
    """Refuses a path `name` that is not a readable file (with `folder`, folder): a wrong path
    stops a command here, before it opens a run or reads the data."""
    path = Path(value).expanduser()
    kind = "folder" if folder else "file"
    if not path.exists():
        problem = f"no such {kind}"
    elif not (path.is_dir() if folder else path.is_file()):
        problem = f"is not a {kind}"
    elif not os.access(path, os.R_OK | (os.X_OK if folder else 0)):
        problem = "cannot be read"
    else:
        return
    raise DataValidationError(f"{name}: {problem}: {path}")


@dataclass(frozen=True)
class CohortSpec(Settings):
    """Which rows form the cohort. Defaults are the paper's (Table 1)."""

    conditions: tuple[str, ...] = CONDITIONS
    light_fst: tuple[int, ...] = LIGHT_FST
    dark_fst: tuple[int, ...] = DARK_FST

    def check(self) -> None:
        if not self.conditions:
            raise DataValidationError("conditions: at least one condition is needed")
        if len(set(self.conditions)) != len(self.conditions):
            raise DataValidationError(f"conditions: listed twice in {list(self.conditions)}")
        for name, values in (("light_fst", self.light_fst), ("dark_fst", self.dark_fst)):
            if not values or not set(values) <= {1, 2, 3, 4, 5, 6}:
                raise DataValidationError(f"{name}: needs skin types from 1-6, got {values}")
        if set(self.light_fst) & set(self.dark_fst):
            raise DataValidationError(
                f"light_fst {self.light_fst} and dark_fst {self.dark_fst} overlap"
            )

    @property
    def labels(self) -> tuple[str, ...]:
        """Conditions in alphabetical order: the classifiers' class indices."""
        return tuple(sorted(self.conditions))


@dataclass(frozen=True)
class PrepareConfig(Settings):
    """Inputs of the `prepare` stage. No `metadata_csv` and `image_dir`: the demo dataset;
    given ones must be a readable file and folder when the config is made."""

    metadata_csv: str | None = setting(
        None,
        "Fitzpatrick17k-format metadata CSV. Empty: the embedded demo dataset.",
    )
    image_dir: str | None = setting(
        None,
        "Folder of the images (<md5hash>.jpg, or the CSV's `path` column relative to it). "
        "Empty: the embedded demo dataset.",
    )
    scenario: Scenario = setting(
        Scenario.I,
        "i: train on light+dark; ii: light + the dark flexible subset; iii: light only.",
    )
    seed: int = setting(0, "Repeat seed: picks the flexible subsets and seeds every stage.")
    val_fraction: float = setting(
        0.1,
        "Share of each (condition, skin group) of the training set held out for validation. "
        "0 gives the paper's split sizes (classifiers then need --selection last or test).",
    )
    exclude_test_of: tuple[Scenario, ...] = setting(
        (),
        "Comma list of scenarios whose test images (same seed) this scenario's train and "
        "validation splits leave out; for scenario i, ii,iii drops the non-flexible dark "
        "images. Empty: the paper's splits.",
    )
    conditions: tuple[str, ...] = setting(
        CONDITIONS, "Comma list of the conditions (labels) to classify."
    )
    light_fst: tuple[int, ...] = setting(
        LIGHT_FST, "Comma list of the majority (light) skin types."
    )
    dark_fst: tuple[int, ...] = setting(DARK_FST, "Comma list of the minority (dark) skin types.")
    flexible_per_condition: int = setting(
        FLEXIBLE_PER_CONDITION, "Images per condition in each flexible subset."
    )
    skip_missing: bool = setting(
        False,
        "true: drop rows whose image is missing or corrupt (listed in "
        "splits/dropped_images.csv) instead of stopping.",
    )
    near_duplicates: NearDuplicates = setting(
        NearDuplicates.REPORT,
        "Near-duplicate images in the cohort (re-encoded, resized, cropped, watermarked copies "
        "under another md5hash): report (log them in splits/near_duplicates.csv and warn; the "
        "splits stay the paper's), drop (train and validation lose every image that "
        "near-duplicates a test image; the test split keeps its size), off.",
    )
    near_duplicate_features: DuplicateFeatures = setting(
        DuplicateFeatures.AUTO,
        "Features near-duplicates are compared in: resnet18 (ImageNet weights file needed), "
        "thumbnails, or auto (resnet18 where its weights file is present, else thumbnails).",
    )
    near_duplicate_similarity: float | None = setting(
        None,
        "Cosine similarity of features at or above which two images are near-duplicates. "
        "Empty: 0.942 for thumbnails (calibrated on the demo's copies), 0.95 for resnet18.",
    )
    near_duplicate_hash_distance: int = setting(
        0,
        "Perceptual-hash (pHash, 64 bits) Hamming distance at or below which two images are "
        "near-duplicates, whatever their features say (0: the same hash, as a re-encoded or "
        "resized copy has; photographs' copies are often within 4); -1 leaves the hash out.",
    )

    def check(self) -> None:
        self.cohort  # noqa: B018 - constructing it checks conditions and skin types
        if (self.metadata_csv is None) != (self.image_dir is None):
            missing = "metadata_csv" if self.metadata_csv is None else "image_dir"
            raise DataValidationError(
                f"{missing} is empty: give both metadata_csv and image_dir, "
                "or neither for the demo data"
            )
        if self.metadata_csv is not None:
            check_input_path("metadata_csv", self.metadata_csv, folder=False)
            check_input_path("image_dir", self.image_dir, folder=True)
        check_seed("seed", self.seed)
        if not 0 <= self.val_fraction < 1:
            raise DataValidationError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        check_exclusion(self.scenario, self.exclude_test_of)
        if self.flexible_per_condition < 1:
            raise DataValidationError(
                f"flexible_per_condition must be at least 1, got {self.flexible_per_condition}"
            )
        similarity = self.near_duplicate_similarity
        require(
            similarity is None or -1 <= similarity <= 1,
            f"near_duplicate_similarity must be a cosine similarity in [-1, 1], got {similarity}",
        )
        require(
            -1 <= self.near_duplicate_hash_distance <= 64,
            "near_duplicate_hash_distance must be in [-1, 64] (bits of a 64-bit hash), got "
            f"{self.near_duplicate_hash_distance}",
        )

    @property
    def cohort(self) -> CohortSpec:
        return CohortSpec(self.conditions, self.light_fst, self.dark_fst)


@dataclass(frozen=True)
class DownloadConfig(Settings):
    """Settings of the `download` command."""

    metadata_csv: str = setting("", "Fitzpatrick17k-format CSV with md5hash and url columns.")
    image_dir: str = setting("", "Folder for the images, <md5hash>.jpg each (created if absent).")
    all: bool = setting(
        False,
        "true: every row with a url; false: the study's cohort only (the conditions, FST 1-2 "
        "and 5-6: the paper's Table 1).",
    )
    conditions: tuple[str, ...] = setting(CONDITIONS, "The cohort's conditions (without --all).")
    connections: int = setting(8, "Downloads at the same time.")
    requests_per_second: float = setting(2.0, "Most requests per second to any one host.")
    timeout: float = setting(30.0, "Seconds to wait for a connection or for data.")
    deadline: float = setting(
        300.0,
        "Seconds one try at a file may take in all: connection, headers and whole body "
        "(default 300: 5 min). Past it the try fails as `deadline passed` (retried), so a "
        "server sending a trickle cannot hold a file for ever.",
    )
    max_bytes: int = setting(
        50_000_000,
        "Largest file kept, in bytes (default 50000000: 50 MB). A larger body, announced or "
        "counted as it arrives, is cut off and fails as `larger than max_bytes` (not retried).",
    )
    retries: int = setting(
        4, "Tries after the first on connection errors, timeouts, deadlines, 5xx, 429."
    )
    backoff: float = setting(1.0, "Seconds before the first retry; doubled for each next one.")

    def check(self) -> None:
        require(bool(self.metadata_csv), "metadata_csv is needed: the CSV with the image URLs")
        require(bool(self.image_dir), "image_dir is needed: where the images go")
        check_input_path("metadata_csv", self.metadata_csv, folder=False)
        folder = Path(self.image_dir).expanduser()
        require(not folder.exists() or folder.is_dir(), f"image_dir: is not a folder: {folder}")
        require(
            not folder.exists() or os.access(folder, os.W_OK | os.X_OK),
            f"image_dir: cannot be written: {folder}",
        )
        for name in ("connections", "retries"):
            minimum = 1 if name == "connections" else 0
            value = getattr(self, name)
            require(value >= minimum, f"{name} must be at least {minimum}, got {value}")
        for name in ("requests_per_second", "timeout"):
            value = getattr(self, name)
            require(value > 0, f"{name} must be positive, got {value}")
        for name in ("deadline", "max_bytes"):
            value = getattr(self, name)
            require(value >= 1, f"{name} must be at least 1, got {value}")
        require(self.backoff >= 0, f"backoff must be >= 0, got {self.backoff}")
