"""Manifests: the tables of images every stage passes on, their columns and their identity.

A split manifest (from `prepare`) has SPLIT_COLUMNS first, then the cohort's own columns
(`sha256` of the file among them); stages read the IMAGE_COLUMNS of it. `path` is absolute.
"""

import hashlib
import re
from collections.abc import Sequence

import pandas as pd

from skindiff.errors import SkindiffError

# What every image row carries: identity, annotation, skin-type group and file.
IMAGE_COLUMNS = ("md5hash", "label", "fitzpatrick_scale", "group", "path")
SPLIT_COLUMNS = ("md5hash", "label", "fitzpatrick_scale", "group", "split", "path")
# A classifier's predictions, before one prob_<label slug> column per class.
PREDICTION_COLUMNS = ("md5hash", "label", "predicted", "fitzpatrick_scale", "group")
# md5hash names files (`<md5hash>.jpg` in the image folder, the generated images), so it must
# be one plain name: no separator, no `..`, nothing a file system could read differently.
_FILE_NAME = re.compile(r"[0-9A-Za-z_-]+")
FILE_NAME_RULE = "letters, digits, '_' and '-'"


def usable_as_file_name(md5hash: str) -> bool:
    """Whether `md5hash` can name a file inside a folder (see FILE_NAME_RULE)."""
    return _FILE_NAME.fullmatch(md5hash) is not None


def require_columns(frame: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise SkindiffError(f"{name} lacks the column(s) {', '.join(missing)}")


def image_rows(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    """The IMAGE_COLUMNS of a manifest, with a fresh index."""
    require_columns(frame, IMAGE_COLUMNS, name)
    return frame[list(IMAGE_COLUMNS)].reset_index(drop=True)


def content_digest(frame: pd.DataFrame) -> str:
    """Digest of a set of images by content and annotation, independent of row order and paths
    (rows need `sha256`, the digest of the image file)."""
    require_columns(frame, ("md5hash", "label", "fitzpatrick_scale", "sha256"), "manifest")
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
