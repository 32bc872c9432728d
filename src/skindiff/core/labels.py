"""How a label (a condition's name) becomes part of MLflow keys, tokens and file names.

Only the standard library is imported here: the settings' checks use it while `skindiff --help`
builds its options.
"""

import re
import unicodedata
from collections.abc import Iterable, Mapping

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
