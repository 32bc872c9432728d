"""Manifests: the tables of images every stage passes on, their columns and their identity.

A split manifest (from `prepare`) has SPLIT_COLUMNS first, then the cohort's own columns
(`sha256` of the file among them); stages read the IMAGE_COLUMNS of it. `path` is absolute.
"""

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence

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


_LETTERS_AND_DIGITS = re.compile(r"[^\W_]+")


def slug(text: str) -> str:
    """A label's name in MLflow keys (metrics, tags) and file names: `basal cell carcinoma` ->
    `basal_cell_carcinoma`, `Psoríasis ✓` -> `psoriasis`, `../evil psoriasis` -> `evil_psoriasis`.

    Lower case, accents and other marks dropped (NFKD), letters and digits of any script kept
    (NFC), every run of anything else one `_`, none at either end. So it is made of what
    MLflow's keys allow (word characters), and no path: nothing in it for `/`, `.` or `..` to
    resolve. ASCII labels keep the slugs they had before non-ASCII ones were allowed for, so
    earlier runs' keys still match."""
    decomposed = unicodedata.normalize("NFKD", text.lower())
    bare = "".join(c for c in decomposed if not unicodedata.category(c).startswith("M"))
    return "_".join(_LETTERS_AND_DIGITS.findall(unicodedata.normalize("NFC", bare)))


# A slug ends keys such as `skindiff.token.<slug>` and `test_precision_<slug>` (MLflow takes at
# most 250 characters) and names files `<slug>.safetensors` (at most 255 bytes).
SLUG_MAX_BYTES = 100
# Slugs that would give a key skindiff's own metrics have: `n_train_dark` (the group),
# `n_train_fst5_<slug>` (the skin type), `test_f1_macro` and `test_f1_macro_dark` (averages).
_TAKEN_SLUG = re.compile(r"light|dark|weighted|(macro|fst\d+)(_.*)?")


def label_key_problem(labels: Iterable[str], where: Mapping[str, str] | None = None) -> str | None:
    """Why `labels` cannot name MLflow keys and files, in one line, or None: a label whose slug
    is empty, longer than SLUG_MAX_BYTES or taken by skindiff's own metric names, or two labels
    with one slug. `where` says where a label is (`line 7`), to name it by."""
    where = where or {}

    def named(label: str) -> str:
        return f"{label!r}" + (f" ({where[label]})" if label in where else "")

    seen: dict[str, str] = {}
    for label in labels:
        name = slug(label)
        if not name:
            return f"label {named(label)} has no letter or digit to name MLflow keys and files by"
        if len(name.encode()) > SLUG_MAX_BYTES:
            return (
                f"label {named(label)} is too long to name MLflow keys and files by: its slug "
                f"has {len(name.encode())} bytes, at most {SLUG_MAX_BYTES}"
            )
        if _TAKEN_SLUG.fullmatch(name):
            return (
                f"label {named(label)} would give metrics the names of skindiff's own (its "
                f"slug {name!r}; light, dark, weighted, macro..., fst<k>... are taken)"
            )
        other = seen.setdefault(name, label)
        if other != label:
            return (
                f"labels {named(other)} and {named(label)} both become {name!r} in MLflow keys "
                f"and file names; rename one of them"
            )
    return None
