"""Logs the `prepare` stage: params, split manifests, count tables and dataset inputs."""

import tempfile
import warnings
from pathlib import Path

import mlflow
import mlflow.data
import pandas as pd

from skindiff.data.prepare import (
    PrepareConfig,
    PreparedScenario,
    content_digest,
    prepare_scenario,
    resolve_dataset,
    slug,
    source_fingerprint,
    split_counts,
    write_prepared,
)
from skindiff.data.splits import SPLIT_NAMES
from skindiff.errors import SkindiffError
from skindiff.options import DATA, option_values
from skindiff.tracking.reuse import RUN_KEY_TAG, find_finished_run, run_key
from skindiff.tracking.runs import stage_run

DATASET_DIGEST_TAG = "skindiff.dataset_digest"


def split_digest_tag(split: str) -> str:
    """Tag holding the content digest of one split of a prepare run."""
    return f"skindiff.digest.{split}"


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


def prepare_key(config: PrepareConfig) -> str:
    """Reuse key of a prepare run: its params and the dataset files as they are on disk."""
    source = resolve_dataset(config.metadata_csv, config.image_dir)
    return run_key("prepare", option_values(DATA, config), {"source": source_fingerprint(source)})


def run_prepare(config: PrepareConfig) -> str:
    """Runs `prepare` as an MLflow run and returns its run id."""
    run_name = f"{config.scenario}/seed-{config.seed}/prepare"
    with stage_run("prepare", run_name, option_values(DATA, config)) as run:
        mlflow.set_tag(RUN_KEY_TAG, prepare_key(config))
        prepared = prepare_scenario(config)
        source = prepared.source
        manifests = {split: prepared.splits.manifest(split) for split in SPLIT_NAMES}
        mlflow.set_tags(
            {
                "skindiff.metadata_csv": str(source.metadata_csv.resolve()),
                "skindiff.image_dir": str(source.image_dir.resolve()),
                "skindiff.demo_data": str(source.is_demo).lower(),
                DATASET_DIGEST_TAG: content_digest(pd.concat(manifests.values())),
            }
            | {split_digest_tag(s): content_digest(m) for s, m in manifests.items()}
        )
        with tempfile.TemporaryDirectory() as tmp:
            write_prepared(prepared, tmp)
            mlflow.log_artifacts(tmp)
        mlflow.log_metrics(count_metrics(prepared))
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
    return run.info.run_id


def ensure_prepare(config: PrepareConfig) -> str:
    """A finished prepare run for `config` on the data as it is now: found, or run now."""
    found = find_finished_run(prepare_key(config))
    return found.info.run_id if found else run_prepare(config)


def load_split(prepare_run_id: str, split: str) -> pd.DataFrame:
    """One split manifest of a prepare run (`content_digest` of it identifies its content)."""
    run = mlflow.get_run(prepare_run_id)
    if run.data.tags.get("mlflow.project.entryPoint") != "prepare":
        raise SkindiffError(f"run {prepare_run_id} is not a prepare run")
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(
            run_id=prepare_run_id, artifact_path=f"splits/{split}.csv", dst_path=tmp
        )
        return pd.read_csv(Path(path), keep_default_na=False)
