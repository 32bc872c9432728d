"""Features for the quality measures: the input of a network's last linear layer, cached by the
image files' content."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from skindiff.classify.models import build_classifier
from skindiff.classify.train import predict
from skindiff.core.files import cache_dir
from skindiff.quality.features import (
    FEATURES_DIR,
    cached_features,
    file_digest,
    last_linear,
    penultimate_features,
)

LABELS = ("a", "b", "c")


def image_rows(folder: Path, n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(n):
        path = folder / f"img{seed}-{k}.png"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
        rows.append({"md5hash": f"m{seed}{k}", "label": LABELS[k % 3], "path": str(path)})
    return pd.DataFrame(rows).assign(fitzpatrick_scale=5, group="dark")


def classifier(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_classifier("tiny", len(LABELS))


def test_features_are_what_the_last_layer_turns_into_the_models_scores(tmp_path: Path):
    rows, model = image_rows(tmp_path, 7), classifier(0)
    features = penultimate_features(model, rows, image_size=32, batch_size=3)
    assert features.shape == (7, last_linear(model).in_features)
    logits = last_linear(model)(torch.from_numpy(features)).log_softmax(1).exp()
    probabilities = predict(model, rows, LABELS, 32, 4)[[f"prob_{label}" for label in LABELS]]
    assert logits.detach().numpy() == pytest.approx(probabilities.to_numpy(), abs=1e-5)


def test_features_are_cached_by_file_content_and_computed_once(tmp_path: Path):
    rows = image_rows(tmp_path / "first", 4)
    first = cached_features("tiny-test", classifier(0), rows, 32)
    folder = cache_dir() / FEATURES_DIR / "tiny-test"
    assert {f.stem for f in folder.glob("*.npy")} >= {file_digest(p) for p in rows["path"]}

    # another network under the same name: every image is read from the cache
    assert np.array_equal(cached_features("tiny-test", classifier(1), rows, 32), first)
    # the same files elsewhere, and one new image: only the new one is computed, by this model
    copies = image_rows(tmp_path / "copies", 4)
    more = pd.concat([copies, image_rows(tmp_path / "new", 1, seed=5)], ignore_index=True)
    other = classifier(1)
    got = cached_features("tiny-test", other, more, 32)
    assert np.array_equal(got[:4], first)
    assert np.allclose(got[4], penultimate_features(other, more.iloc[4:], 32)[0])
    assert not np.allclose(got[4], penultimate_features(classifier(0), more.iloc[4:], 32)[0])
