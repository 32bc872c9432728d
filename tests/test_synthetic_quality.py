"""The `synthetic_quality` stage on the demo, and the memorization measure on real image files:
copies of training images are flagged, unrelated images are not."""

from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from conftest import fast_configs
from skindiff.classify.models import build_classifier
from skindiff.classify.train import ClassifierConfig
from skindiff.data.demo import write_demo_dataset
from skindiff.data.image_signatures import pixel_thumbnails
from skindiff.quality.config import QualityConfig
from skindiff.quality.features import Penultimate, image_features
from skindiff.quality.score import memorization
from skindiff.tracking.prepare import ensure_prepare
from skindiff.tracking.runs import load_split
from skindiff.tracking.synthetic_quality import reference_rows, run_synthetic_quality

CLASSIFIER = ClassifierConfig(arch="tiny", epochs=1, batch_size=16, image_size=32)


def test_memorization_flags_copies_of_training_images_and_not_unrelated_ones(tmp_path: Path):
    demo = write_demo_dataset(tmp_path / "demo", seed=0)
    rows = pd.read_csv(demo.metadata_csv).head(40)
    rows = rows.assign(path=[str(Path(demo.image_dir) / f"{m}.jpg") for m in rows["md5hash"]])
    training = rows.assign(group="dark").reset_index(drop=True)
    copies, unrelated = [], []
    rng = np.random.default_rng(0)
    for k in range(10):
        original = Image.open(training["path"][k]).convert("RGB")
        copy = tmp_path / f"copy-{k}.jpg"
        if k % 2:  # slightly resized, re-encoded
            original = original.resize((original.width * 9 // 10, original.height * 9 // 10))
        original.save(copy, quality=90)
        copies.append(training.iloc[k].to_dict() | {"path": str(copy)})
        blocks = tmp_path / f"blocks-{k}.jpg"
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize(
            (96, 96), Image.NEAREST
        ).save(blocks)
        unrelated.append(training.iloc[k].to_dict() | {"path": str(blocks)})
    torch.manual_seed(0)
    model = build_classifier("tiny", 7)
    train_features = image_features(Penultimate(model), training, 64)
    # the copies' "sources" are other training images: a copy of image k made from image k+20
    sources = np.arange(10) + 20
    found = memorization(
        image_features(Penultimate(model), pd.DataFrame(copies), 64), train_features, sources, 0.95
    )
    assert found.share == 1
    assert list(found.per_image["nearest_index"]) == list(range(10))
    none = memorization(
        image_features(Penultimate(model), pd.DataFrame(unrelated), 64),
        train_features,
        sources,
        0.95,
    )
    assert none.share == 0


def test_pixel_thumbnails_flag_copies_and_not_other_images_of_a_condition(tmp_path: Path):
    demo = write_demo_dataset(tmp_path / "demo", seed=0)
    rows = pd.read_csv(demo.metadata_csv)
    rows = rows[rows["label"] == rows["label"].iloc[0]].head(30)  # one condition only
    paths = [str(Path(demo.image_dir) / f"{m}.jpg") for m in rows["md5hash"]]
    training, others = paths[:20], paths[20:]
    copies = []
    for k, path in enumerate(training[:6]):
        image = Image.open(path).convert("RGB")
        if k % 2:
            image = image.resize((image.width * 9 // 10, image.height * 9 // 10))
        copies.append(tmp_path / f"copy-{k}.jpg")
        image.save(copies[-1], quality=85)
    originals = pixel_thumbnails(training)
    sources = np.full(6, -1)
    assert memorization(pixel_thumbnails(copies), originals, sources, 0.95).share == 1
    assert memorization(pixel_thumbnails(others), originals, np.full(10, -1), 0.95).share == 0


def test_synthetic_quality_scores_a_generate_run_and_is_reused(tracking: str, tmp_path: Path):
    data, ti, lora, generate = fast_configs()
    config = QualityConfig(quality_features="classifier")
    run_id = run_synthetic_quality(data, ti, lora, generate, CLASSIFIER, config, reuse=True)
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for measure in ("fd", "kid", "kid_std", "precision", "recall", "density", "coverage"):
        assert f"{measure}_classifier" in metrics
        assert f"{measure}_classifier_light_sources" in metrics
    # a classifier's features make a condition's images alike: copies are looked for in pixels
    assert run.data.params["memorization_space"] == "pixels"
    assert 0 <= metrics["memorized_share_pixels"] <= 1
    assert run.data.params["quality_features"] == "classifier"
    files = {a.path for a in MlflowClient().list_artifacts(run_id, "quality")}
    assert files == {"quality/metrics.csv", "quality/per_image.csv", "quality/nearest_pairs.png"}
    per_image = pd.read_csv(
        mlflow.artifacts.download_artifacts(f"runs:/{run_id}/quality/per_image.csv")
    )
    assert per_image["nearest_similarity"].between(-1, 1 + 1e-6).all()
    assert (per_image["nearest_md5hash"] != per_image["md5hash"]).all()  # never its source
    assert run_synthetic_quality(data, ti, lora, generate, CLASSIFIER, config, reuse=True) == run_id


@pytest.mark.parametrize("scenario", ["i", "ii", "iii"])
def test_the_reference_set_is_dark_and_never_a_test_image(tracking: str, scenario: str):
    data = replace(fast_configs()[0], scenario=scenario)
    prepare = ensure_prepare(data)
    reference = reference_rows(data, prepare)
    test = set(load_split(prepare, "test")["md5hash"])
    assert len(reference) >= 10 and set(reference["group"]) == {"dark"}
    assert not set(reference["md5hash"]) & test
    if scenario == "iii":  # iii trains on nothing dark: ii's dark flexible subset
        ii = ensure_prepare(replace(data, scenario="ii"))
        train = pd.concat([load_split(ii, "train"), load_split(ii, "val")])
        assert set(reference["md5hash"]) == set(train[train["group"] == "dark"]["md5hash"])
