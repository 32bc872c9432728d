"""The `prepare` stage as an MLflow run: through `mlflow run` and in-process, on a real server."""

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, cohort_rows, write_dataset
from skindiff.core.manifest import SPLIT_COLUMNS as MANIFEST_COLUMNS
from skindiff.core.manifest import content_digest
from skindiff.data.prepare import PrepareConfig, prepare_scenario
from skindiff.data.splits import SPLIT_NAMES
from skindiff.errors import SkindiffError
from skindiff.tracking.prepare import ensure_prepare, run_prepare

ENTRY_POINT = "mlflow.project.entryPoint"


def logged_manifest(run_id: str, split: str, dst: Path) -> pd.DataFrame:
    path = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=f"splits/{split}.csv", dst_path=str(dst)
    )
    return pd.read_csv(path, keep_default_na=False)


def test_mlflow_run_prepare_logs_splits(tracking: str, demo_dataset, tmp_path: Path) -> None:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlflow",
            "run",
            str(REPO),
            "-e",
            "prepare",
            "--env-manager",
            "local",
            "--experiment-id",
            tracking,
            "-P",
            "scenario=ii",
            "-P",
            "seed=42",
            "-P",
            "val_fraction=0.2",
        ],
        cwd=tmp_path,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    (run_info,) = mlflow.search_runs([tracking], output_format="list")
    assert run_info.info.status == "FINISHED"
    assert run_info.data.tags[ENTRY_POINT] == "prepare"
    assert run_info.data.params["scenario"] == "ii" and run_info.data.params["seed"] == "42"
    assert not list((tmp_path).glob("mlruns")), "logged to a local store, not the server"

    # Same inputs in-process: the logged manifests are exactly these splits.
    expected = prepare_scenario(PrepareConfig(scenario="ii", seed=42, val_fraction=0.2)).splits
    run_id = run_info.info.run_id
    for split in SPLIT_NAMES:
        manifest = logged_manifest(run_id, split, tmp_path / split)
        assert list(manifest.columns[: len(MANIFEST_COLUMNS)]) == list(MANIFEST_COLUMNS)
        assert set(manifest["split"]) <= {split}
        assert sorted(manifest["md5hash"]) == sorted(getattr(expected, split)["md5hash"])
        assert all(Path(p).is_file() for p in manifest["path"])
        assert run_info.data.metrics[f"n_{split}"] == len(manifest)
        for group, n in manifest.groupby("group").size().items():
            assert run_info.data.metrics[f"n_{split}_{group}"] == n

    counts = pd.read_csv(
        mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="splits/counts.csv")
    )
    test_counts = counts[counts["split"] == "test"]
    assert test_counts["count"].sum() == len(expected.test)
    table = mlflow.artifacts.load_text(f"runs:/{run_id}/splits/counts.md")
    assert f"## test ({len(expected.test)} images)" in table

    # near-duplicates, looked for by default (report): logged, the splits left as they were
    found = prepare_scenario(PrepareConfig(scenario="ii", seed=42)).near_duplicates
    assert run_info.data.tags["skindiff.near_duplicates"] == "report"
    assert run_info.data.tags["skindiff.near_duplicate_rule"] == found.rule.describe()
    for name, value in found.metrics().items():
        assert run_info.data.metrics[name] == value, name
    pairs = pd.read_csv(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="splits/near_duplicates.csv", dst_path=str(tmp_path)
        )
    )
    assert len(pairs) == run_info.data.metrics["n_near_duplicate_pairs"] > 0
    artifacts = {a.path for a in MlflowClient().list_artifacts(run_id, "splits")}
    assert "splits/near_duplicates.png" in artifacts

    inputs = MlflowClient().get_run(run_id).inputs.dataset_inputs
    by_context = {
        next(t.value for t in item.tags if t.key == "mlflow.data.context"): item.dataset
        for item in inputs
    }
    assert set(by_context) == set(SPLIT_NAMES)
    for split, dataset in by_context.items():
        assert dataset.digest == content_digest(expected.manifest(split))[:16]
        assert dataset.name == f"demo/{split}"


def test_skip_missing_logs_dropped_images(tracking: str, tmp_path: Path) -> None:
    rows = cohort_rows()
    csv, images = write_dataset(tmp_path, rows)
    (images / f"{rows[0]['md5hash']}.jpg").unlink()
    config = PrepareConfig(
        metadata_csv=str(csv),
        image_dir=str(images),
        conditions=("a", "b"),
        flexible_per_condition=4,
        skip_missing=True,
    )
    run_id = run_prepare(config)
    dropped = pd.read_csv(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="splits/dropped_images.csv", dst_path=str(tmp_path / "d")
        )
    )
    assert dropped["md5hash"].tolist() == [rows[0]["md5hash"]]
    assert dropped["problem"].tolist() == ["missing"]
    assert mlflow.get_run(run_id).data.tags["skindiff.demo_data"] == "false"


def test_prepare_without_the_test_images_of_ii_and_iii(tracking: str, demo_dataset) -> None:
    paper = mlflow.get_run(run_prepare(PrepareConfig()))
    excluding = PrepareConfig(exclude_test_of=("ii", "iii"))
    run_id = ensure_prepare(excluding)
    assert run_id != paper.info.run_id  # keyed by the option: the paper's splits not re-used
    assert ensure_prepare(excluding) == run_id
    run = mlflow.get_run(run_id)
    assert run.data.params["exclude_test_of"] == "ii,iii"
    assert paper.data.params["exclude_test_of"] == ""
    counts, before = run.data.metrics, paper.data.metrics
    assert "n_train_dark" not in counts and "n_val_dark" not in counts
    dark = before["n_train_dark"] + before["n_val_dark"]
    assert counts["n_train"] + counts["n_val"] == before["n_train"] + before["n_val"] - dark
    assert counts["n_test"] == counts["n_test_dark"] == before["n_test"]
    table = mlflow.artifacts.load_text(f"runs:/{run_id}/splits/counts.md")
    assert table.startswith("# Scenario i, seed 0, without the test images of ii, iii\n")


def test_near_duplicates_drop_is_its_own_run_and_logs_what_it_dropped(
    tracking: str, demo_dataset
) -> None:
    reported = mlflow.get_run(run_prepare(PrepareConfig(seed=42)))
    run_id = ensure_prepare(PrepareConfig(seed=42, near_duplicates="drop"))
    assert run_id != reported.info.run_id  # a settings change: the paper's splits not re-used
    dropped = mlflow.get_run(run_id)
    assert dropped.data.tags["skindiff.near_duplicates"] == "drop"
    counts, before = dropped.data.metrics, reported.data.metrics
    n_dropped = counts["n_near_duplicates_dropped"]
    assert n_dropped == before["n_test_images_with_training_copy"] > 0  # one copy each here
    assert counts["n_train"] + counts["n_val"] == before["n_train"] + before["n_val"] - n_dropped
    assert counts["n_test"] == before["n_test"]
    assert "n_near_duplicates_dropped" not in before
    off = mlflow.get_run(run_prepare(PrepareConfig(seed=42, near_duplicates="off")))
    assert not any(name.startswith("n_near_duplicate") for name in off.data.metrics)
    assert off.data.tags["skindiff.near_duplicates"] == "off"


def test_resnet18_features_without_weights_stop_before_a_run_opens(
    tracking: str, demo_dataset, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    with pytest.raises(SkindiffError, match="near_duplicate_features resnet18"):
        run_prepare(PrepareConfig(near_duplicate_features="resnet18"))
    assert mlflow.search_runs([tracking], output_format="list") == []
