"""Logs the `prepare` stage: params, split manifests, count tables, near-duplicates and
dataset inputs."""

import io
import logging
import tempfile
import warnings

import mlflow
import mlflow.data
import pandas as pd

from skindiff.core.labels import slug
from skindiff.core.manifest import content_digest
from skindiff.data.config import NearDuplicates, PrepareConfig
from skindiff.data.image_signatures import require_features, resolve_features
from skindiff.data.prepare import (
    PreparedScenario,
    prepare_scenario,
    resolve_dataset,
    scenario_rows,
    source_fingerprint,
    split_counts,
    write_prepared,
)
from skindiff.data.skin_tone import ita_agreement, ita_by_skin_type
from skindiff.data.splits import SPLIT_NAMES
from skindiff.options import DATA
from skindiff.tracking.names import (
    DATASET_DIGEST_TAG,
    DATASET_TAGS,
    NEAR_DUPLICATE_RULE_TAG,
    NEAR_DUPLICATES_TAG,
    Stage,
    split_digest_tag,
)
from skindiff.tracking.runs import load_split
from skindiff.tracking.stage import StageCall, StageInputs, run_stage

log = logging.getLogger(__name__)


def count_metrics(prepared: PreparedScenario) -> dict[str, float]:
    """Image counts per split: `n_train`, `n_train_dark`, `n_train_fst5`, `n_train_psoriasis`,
    `n_train_fst5_psoriasis`, ..."""
    counts = split_counts(prepared)
    metrics: dict[str, float] = {}
    for split in SPLIT_NAMES:
        rows = counts[counts["split"] == split]
        metrics[f"n_{split}"] = float(rows["count"].sum())
        for key, names in (
            ("group", lambda v: v),
            ("fitzpatrick_scale", lambda v: f"fst{v}"),
            ("label", slug),
        ):
            for value, n in rows.groupby(key)["count"].sum().items():
                metrics[f"n_{split}_{names(value)}"] = float(n)
        for (fst, label), n in rows.groupby(["fitzpatrick_scale", "label"])["count"].sum().items():
            metrics[f"n_{split}_fst{fst}_{slug(label)}"] = float(n)
    return metrics


def skin_tone_metrics(prepared: PreparedScenario) -> dict[str, float]:
    """The scenario's skin tones against its labels: `ita_fst_spearman` (Spearman's rho of ITA
    and Fitzpatrick type, negative when they agree), `ita_dark_auc` (ITA telling the dark group
    from the light one), `ita_measured_fraction`, `ita_median_fst<k>` per type and
    `ita_median_<split>_<group>` (e.g. ita_median_test_dark)."""
    rows = scenario_rows(prepared)
    agreement = ita_agreement(rows)
    metrics = {
        "ita_fst_spearman": agreement.spearman,
        "ita_dark_auc": agreement.dark_auc,
        "ita_measured_fraction": agreement.measured / len(rows),
    }
    for row in ita_by_skin_type(rows).itertuples():
        metrics[f"ita_median_fst{row.fitzpatrick_scale}"] = row.ita_median
    for (split, group), itas in rows.groupby(["split", "group"])["ita"]:
        metrics[f"ita_median_{split}_{group}"] = itas.median()
    return {name: float(value) for name, value in metrics.items() if pd.notna(value)}


def run_prepare(config: PrepareConfig, *, reuse: bool = False) -> str:
    """Runs `prepare` (with `reuse`: returns a finished run made from the same settings and the
    data as it is on disk now, if there is one); returns the run id."""
    call = StageCall(
        Stage.PREPARE,
        f"{config.scenario}/seed-{config.seed}/prepare",
        DATA.values(config),
        preview=lambda: preview_splits(config),
    )

    def resolve() -> StageInputs:
        # The files as they are on disk: content digests come later, from the image check.
        digests = {"source": source_fingerprint(resolve_dataset(config))}
        if config.near_duplicates != NearDuplicates.OFF:
            # `auto` picks by what is installed: the features used are what the run depends on
            digests["near_duplicate_features"] = resolve_features(config.near_duplicate_features)
        return StageInputs(digests=digests)

    def work(inputs: StageInputs, key: str) -> None:
        _log_prepared(prepare_scenario(config), config)

    if config.near_duplicates != NearDuplicates.OFF:
        require_features(config.near_duplicate_features)  # a missing file: before a run opens
    return run_stage(call, resolve, work, reuse=reuse)


def preview_splits(config: PrepareConfig) -> dict[str, pd.DataFrame]:
    """The split manifests a prepare run of `config` would log, as `load_split` reads them
    back (through CSV, so that their content digests are the logged ones)."""
    prepared = prepare_scenario(config)
    return {
        split: pd.read_csv(
            io.StringIO(prepared.splits.manifest(split).to_csv(index=False)), keep_default_na=False
        )
        for split in SPLIT_NAMES
    }


def ensure_prepare(config: PrepareConfig) -> str:
    """A finished prepare run for `config` on the data as it is now: found, or run now."""
    return run_prepare(config, reuse=True)


def near_duplicate_metrics(prepared: PreparedScenario, config: PrepareConfig) -> dict[str, float]:
    """The near-duplicate counts (see NearDuplicateReport.metrics), plus
    `n_near_duplicates_dropped` with `near_duplicates drop`; logs what a user should know
    (copies across the train/test boundary, a capped CSV, one cluster holding most of the
    cohort)."""
    found = prepared.near_duplicates
    if found is None:
        return {}
    metrics = found.metrics()
    dropped = config.near_duplicates == NearDuplicates.DROP
    if dropped:
        metrics["n_near_duplicates_dropped"] = len(found.training_copies)
    n_pairs = metrics["n_near_duplicate_pairs"]
    log.info("near-duplicates (%s): %d pair(s) in the cohort", found.rule.describe(), n_pairs)
    for warning in found.warnings(dropped):
        log.warning("near-duplicates: %s", warning)
    return {name: float(value) for name, value in metrics.items()}


def _log_prepared(prepared: PreparedScenario, config: PrepareConfig) -> None:
    source = prepared.source
    manifests = {split: prepared.splits.manifest(split) for split in SPLIT_NAMES}
    where = (source.metadata_csv.resolve(), source.image_dir.resolve(), str(source.is_demo).lower())
    mlflow.set_tags(
        {tag: str(value) for tag, value in zip(DATASET_TAGS, where, strict=True)}
        | {DATASET_DIGEST_TAG: content_digest(pd.concat(manifests.values()))}
        | {split_digest_tag(s): content_digest(m) for s, m in manifests.items()}
        | {NEAR_DUPLICATES_TAG: str(config.near_duplicates)}
    )
    if prepared.near_duplicates is not None:
        mlflow.set_tag(NEAR_DUPLICATE_RULE_TAG, prepared.near_duplicates.rule.describe())
    with tempfile.TemporaryDirectory() as tmp:
        write_prepared(prepared, tmp)
        mlflow.log_artifacts(tmp)
    mlflow.log_metrics(
        count_metrics(prepared)
        | skin_tone_metrics(prepared)
        | near_duplicate_metrics(prepared, config)
    )
    dataset_name = "demo" if source.is_demo else source.metadata_csv.stem
    for split, manifest in manifests.items():
        with warnings.catch_warnings():
            # MLflow registers its local-file source twice and warns about the ambiguity,
            # and warns that integer columns cannot hold missing values: neither applies.
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(
                manifest,
                source=str(source.metadata_csv.resolve()),
                name=f"{dataset_name}/{split}",
                digest=content_digest(manifest)[:16],
            )
            mlflow.log_input(dataset, context=split)


def split_inputs(
    data: PrepareConfig, prepare_run_id: str | None, splits: tuple[str, ...] = ("train",)
) -> StageInputs:
    """The inputs of a stage that reads `splits` of a prepare run: the given run, else one
    found or run with `data`."""
    prepare_run_id = prepare_run_id or ensure_prepare(data)
    return StageInputs(
        prepare_run_id, {split: load_split(prepare_run_id, split) for split in splits}
    )
