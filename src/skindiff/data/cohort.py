"""The study cohort: chosen conditions, light (majority) and dark (minority) skin-type groups."""

import difflib
from pathlib import Path

import pandas as pd

from skindiff.core.labels import label_key_problem
from skindiff.data.config import CohortSpec
from skindiff.errors import DataValidationError

LIGHT, DARK = "light", "dark"


def select_cohort(metadata: pd.DataFrame, spec: CohortSpec) -> pd.DataFrame:
    """Rows of the chosen conditions and skin-type groups, with a `group` column.

    Unknown (-1) and intermediate skin types are left out; no qc filter. Rows are sorted by
    md5hash so that sampling depends on the data, not on the CSV's row order.
    """
    known = set(metadata["label"])
    for condition in spec.conditions:
        if condition not in known:
            close = difflib.get_close_matches(condition, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise DataValidationError(f"condition {condition!r} has no rows in the metadata{hint}")
    groups = {fst: LIGHT for fst in spec.light_fst} | {fst: DARK for fst in spec.dark_fst}
    chosen = metadata["label"].isin(spec.conditions) & metadata["fitzpatrick_scale"].isin(groups)
    cohort = metadata.loc[chosen].copy()
    cohort["group"] = cohort["fitzpatrick_scale"].map(groups)
    return cohort.sort_values("md5hash", kind="stable").reset_index(drop=True)


def check_label_names(cohort: pd.DataFrame, csv_path: Path) -> None:
    """Refuses labels of the cohort that cannot name MLflow keys and files (every key made from a
    label is its slug: see core.manifest), naming each by its first line in the CSV."""
    lines = cohort.groupby("label")["line"].min().sort_values()
    where = {label: f"line {line}" for label, line in lines.items()}
    problem = label_key_problem(lines.index, where)
    if problem:
        raise DataValidationError(f"{csv_path}: {problem}")


def count_table(frame: pd.DataFrame, labels: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Images per skin type (rows) and condition (columns) with totals, like the paper's Table 1."""
    labels = labels or tuple(sorted(frame["label"].unique()))
    table = pd.crosstab(frame["fitzpatrick_scale"], frame["label"]).reindex(
        columns=list(labels), fill_value=0
    )
    table["total"] = table.sum(axis=1)
    table.loc["total"] = table.sum(axis=0)
    table.index = table.index.map(str)
    table.index.name = "fitzpatrick_scale"
    table.columns.name = None
    return table
