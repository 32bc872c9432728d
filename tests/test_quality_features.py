"""Features for the quality measures: the input of a network's last linear layer, cached by the
image files' content."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from skindiff.classify.data import ManifestDataset
from skindiff.classify.models import build_classifier
from skindiff.classify.train import predict
from skindiff.core.files import cache_dir, sha256_file
from skindiff.errors import SkindiffError
from skindiff.quality.features import (
    FEATURES_DIR,
    INCEPTION_SIZE,
    INCEPTION_WEIGHTS,
    Penultimate,
    cached_features,
    fid_inception,
    image_features,
    inception_file,
    last_linear,
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
    features = image_features(Penultimate(model), rows, image_size=32, batch_size=3)
    assert features.shape == (7, last_linear(model).in_features)
    logits = last_linear(model)(torch.from_numpy(features)).log_softmax(1).exp()
    probabilities = predict(model, rows, LABELS, 32, 4)[[f"prob_{label}" for label in LABELS]]
    assert logits.detach().numpy() == pytest.approx(probabilities.to_numpy(), abs=1e-5)


def test_features_are_cached_by_file_content_and_computed_once(tmp_path: Path):
    rows = image_rows(tmp_path / "first", 4)
    first = cached_features("tiny-test", Penultimate(classifier(0)), rows, 32)
    folder = cache_dir() / FEATURES_DIR / "tiny-test"
    assert {f.stem for f in folder.glob("*.npy")} >= {sha256_file(p) for p in rows["path"]}

    # another network under the same name: every image is read from the cache
    assert np.array_equal(cached_features("tiny-test", Penultimate(classifier(1)), rows, 32), first)
    # the same files elsewhere, and one new image: only the new one is computed, by this model
    copies = image_rows(tmp_path / "copies", 4)
    more = pd.concat([copies, image_rows(tmp_path / "new", 1, seed=5)], ignore_index=True)
    other = classifier(1)
    got = cached_features("tiny-test", Penultimate(other), more, 32)
    assert np.array_equal(got[:4], first)
    assert np.allclose(got[4], image_features(Penultimate(other), more.iloc[4:], 32)[0])
    assert not np.allclose(got[4], image_features(Penultimate(classifier(0)), more.iloc[4:], 32)[0])


def random_inception_weights(path: Path) -> Path:
    """A weights file of the FID Inception's architecture with random weights: the real file
    cannot be downloaded here, and the class builds itself only from a file."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None  # keep the random initial weights

    empty = path.with_suffix(".empty")
    torch.save({}, empty)
    torch.manual_seed(0)
    torch.save(Skeleton("inception-v3-compat", ["2048"], str(empty)).state_dict(), path)
    return path


def test_fid_inception_sees_the_8_bit_images_and_a_missing_file_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(SkindiffError, match=f"{INCEPTION_WEIGHTS} is missing .*fetch https://"):
        fid_inception()
    inception_file().parent.mkdir(parents=True)
    random_inception_weights(inception_file())
    network = fid_inception()
    rows = image_rows(tmp_path / "images", 3)
    features = image_features(network, rows, INCEPTION_SIZE, batch_size=2)
    assert features.shape == (3, 2048)
    # the classifiers' normalised input turned back into the file's 8-bit pixels, exactly
    dataset = ManifestDataset(rows, LABELS, INCEPTION_SIZE, "raw")
    pixels = torch.stack([dataset[i][0] for i in range(3)])
    with torch.inference_mode():
        direct = network.network(pixels)[0].numpy()
    assert features == pytest.approx(direct, abs=1e-5)
