"""Reading and validating Fitzpatrick17k-format metadata (no image access here)."""

from pathlib import Path

import pandas as pd

from skindiff.core.manifest import FILE_NAME_RULE, usable_as_file_name
from skindiff.data.fitzpatrick import REQUIRED_COLUMNS, VALID_FST
from skindiff.errors import DataValidationError

# Line numbers in messages are the CSV's own: the header is line 1, so data row i is line i + 2.
_FIRST_DATA_LINE = 2
_SHOWN = 5  # offending rows named in one message; the count says how many there are in all


def describe_lines(lines: pd.Series, values: pd.Series | None = None) -> str:
    """'line 4 ('7'), line 9 ('x') and 3 more' — the first few culprits of a validation error."""
    shown = [
        f"line {line}" + ("" if values is None else f" ({values.loc[idx]!r})")
        for idx, line in lines.head(_SHOWN).items()
    ]
    extra = len(lines) - len(shown)
    return ", ".join(shown) + (f" and {extra} more" if extra > 0 else "")


def read_metadata(csv_path: Path) -> pd.DataFrame:
    """Reads a Fitzpatrick17k-format CSV and checks it, naming the file and lines at fault.

    Returns every row with `md5hash` and `label` stripped, `fitzpatrick_scale` as int, a
    `path` column (relative to the image folder; `<md5hash>.jpg` unless the CSV has one) and
    a `line` column with the CSV line number for later messages.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataValidationError(f"metadata CSV not found: {csv_path}")
    try:
        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataValidationError(f"{csv_path}: cannot be read as CSV: {first_line}") from None

    missing = [column for column in REQUIRED_COLUMNS if column not in frame.columns]
    if missing:
        raise DataValidationError(
            f"{csv_path}: missing required column(s) {', '.join(missing)}; "
            f"found: {', '.join(frame.columns) or 'none'}"
        )
    frame["line"] = frame.index + _FIRST_DATA_LINE
    for column in ("md5hash", "label"):
        frame[column] = frame[column].str.strip()

    fst = pd.to_numeric(frame["fitzpatrick_scale"].str.strip(), errors="coerce")
    bad = ~fst.isin(VALID_FST)
    if bad.any():
        raise DataValidationError(
            f"{csv_path}: fitzpatrick_scale must be -1 (unknown) or 1-6; {bad.sum()} row(s) are "
            f"not: {describe_lines(frame.loc[bad, 'line'], frame['fitzpatrick_scale'])}"
        )
    frame["fitzpatrick_scale"] = fst.astype(int)

    for column in ("md5hash", "label"):
        empty = frame[column] == ""
        if empty.any():
            raise DataValidationError(
                f"{csv_path}: empty {column} on {empty.sum()} row(s): "
                f"{describe_lines(frame.loc[empty, 'line'])}"
            )
    unnamed = ~frame["md5hash"].map(usable_as_file_name)
    if unnamed.any():
        raise DataValidationError(
            f"{csv_path}: md5hash must be a file name of {FILE_NAME_RULE} (it names the "
            f"images); {unnamed.sum()} row(s) are not: "
            f"{describe_lines(frame.loc[unnamed, 'line'], frame['md5hash'])}"
        )
    repeated = frame["md5hash"].duplicated(keep=False)
    if repeated.any():
        first = frame.loc[repeated, "md5hash"].iloc[0]
        lines = frame.loc[frame["md5hash"] == first, "line"]
        raise DataValidationError(
            f"{csv_path}: md5hash must be unique; {frame.loc[repeated, 'md5hash'].nunique()} "
            f"value(s) repeat, e.g. {first!r} on {describe_lines(lines)}"
        )

    if "path" in frame.columns:
        frame["path"] = frame["path"].str.strip()
        empty = frame["path"] == ""
        if empty.any():
            raise DataValidationError(
                f"{csv_path}: empty path on {empty.sum()} row(s): "
                f"{describe_lines(frame.loc[empty, 'line'])}"
            )
    else:
        frame["path"] = frame["md5hash"] + ".jpg"
    return frame
