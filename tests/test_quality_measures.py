"""The synthetic-image measures against slow references written here: the Fréchet distance with
scipy's matrix square root, KID as the unbiased MMD of all pairs, precision / recall / density /
coverage from full distance matrices (as Naeem et al. define them), nearest training images by
brute force."""

import numpy as np
import pytest
from scipy import linalg

from skindiff.errors import SkindiffError
from skindiff.quality.measures import (
    frechet_distance,
    kernel_distance,
    nearest_training_images,
    precision_recall_density_coverage,
)


def features(seed: int, n: int, dimensions: int = 24, shift: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dimensions)) + shift


def reference_frechet(a: np.ndarray, b: np.ndarray) -> float:
    covariance_a, covariance_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(covariance_a @ covariance_b).real
    difference = a.mean(0) - b.mean(0)
    return float(difference @ difference + np.trace(covariance_a + covariance_b - 2 * root))


def reference_kid(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, over all pairs."""

    def kernel(x, y):
        return (x @ y.T / a.shape[1] + 1) ** 3

    m = len(a)
    k_aa, k_bb, k_ab = kernel(a, a), kernel(b, b), kernel(a, b)
    within = (k_aa.sum() - np.trace(k_aa) + k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
    return float(within - 2 * k_ab.mean())


def reference_coverage(real: np.ndarray, fake: np.ndarray, k: int) -> tuple:
    def radii(x):
        distances = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(distances, axis=1)[:, k]  # column 0 is the point itself

    real_radii, fake_radii = radii(real), radii(fake)
    distances = np.linalg.norm(real[:, None] - fake[None], axis=-1)  # real x fake
    inside = distances <= real_radii[:, None]
    precision = inside.any(0).mean()
    recall = (distances <= fake_radii[None]).any(1).mean()
    density = inside.sum(0).mean() / k
    coverage = (distances.min(1) <= real_radii).mean()
    return precision, recall, density, coverage


def test_frechet_distance_is_zero_on_itself_larger_when_shifted_and_equals_scipys():
    real = features(0, 300)
    assert frechet_distance(real, real) == pytest.approx(0, abs=1e-8)
    other, shifted = features(1, 400), features(1, 400, shift=0.5)
    near, far = frechet_distance(real, other), frechet_distance(real, shifted)
    assert far > near + 5
    assert near == pytest.approx(reference_frechet(real, other), rel=1e-6)
    assert far == pytest.approx(reference_frechet(real, shifted), rel=1e-6)


def test_kid_is_the_unbiased_mmd_and_repeats_from_its_seed():
    real, shifted = features(0, 200), features(1, 200, shift=0.5)
    # subsets as large as the sets: every subset is the whole set, so no spread
    mean, std = kernel_distance(real, shifted)
    assert mean == pytest.approx(reference_kid(real, shifted), rel=1e-9)
    assert std == pytest.approx(0, abs=1e-9)
    same, _ = kernel_distance(real, features(2, 200))
    assert abs(same) < mean / 10

    larger = features(3, 1500, shift=0.5)
    drawn = kernel_distance(features(4, 1200), larger, seed=3)
    assert kernel_distance(features(4, 1200), larger, seed=3) == drawn
    assert drawn[1] > 0


def test_coverage_measures_equal_full_matrix_references_and_their_extremes():
    real, fake = features(0, 60), features(1, 80, shift=0.3)
    got = precision_recall_density_coverage(real, fake, k=5)
    expected = reference_coverage(real, fake, 5)
    found = (got.precision, got.recall, got.density, got.coverage)
    assert found == pytest.approx(expected, abs=1e-6)
    assert 0 < got.precision < 1 and 0 < got.coverage < 1

    far = precision_recall_density_coverage(real, features(1, 80, shift=10.0))
    assert (far.precision, far.recall, far.density, far.coverage) == (0, 0, 0, 0)
    itself = precision_recall_density_coverage(real, real)
    assert (itself.precision, itself.recall, itself.coverage) == (1, 1, 1)


def test_nearest_training_image_never_is_the_source_and_flags_copies():
    training = features(0, 50)
    copies = training[[3, 7]] + 1e-4  # a copy, all but exact
    unrelated = features(9, 4)
    synthetic = np.vstack([training[[3, 7]] + 0.01, copies, unrelated])
    # rows 0-1: variants of their sources 3 and 7; rows 2-3: copies of 3 and 7 from source 20
    sources = np.array([3, 7, 20, 20, -1, -1, -1, -1])
    nearest = nearest_training_images(synthetic, training, sources)

    center = training.mean(0)
    brute = (synthetic - center) / np.linalg.norm(synthetic - center, axis=1, keepdims=True)
    normed = (training - center) / np.linalg.norm(training - center, axis=1, keepdims=True)
    similarities = brute @ normed.T
    for row, source in enumerate(sources):
        if source >= 0:
            assert nearest.source_similarity[row] == pytest.approx(similarities[row, source])
            similarities[row, source] = -np.inf
        else:
            assert np.isnan(nearest.source_similarity[row])
    assert list(nearest.index) == list(similarities.argmax(1))
    assert nearest.similarity == pytest.approx(similarities.max(1), abs=1e-6)

    assert nearest.source_similarity[:2] == pytest.approx(1, abs=1e-3)
    assert nearest.similarity[:2].max() < 0.9  # its source excluded, nothing alike
    assert list(nearest.index[2:4]) == [3, 7] and nearest.similarity[2:4] == pytest.approx(1)
    assert nearest.similarity[4:].max() < 0.9


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: frechet_distance(features(0, 1), features(1, 5)), "at least 2"),
        (lambda: frechet_distance(features(0, 5), features(1, 5, dimensions=3)), "one width"),
        (lambda: precision_recall_density_coverage(features(0, 5), features(1, 9)), "at least 6"),
        (lambda: nearest_training_images(features(0, 2), features(1, 3), np.array([0])), "one"),
    ],
)
def test_bad_inputs_are_one_line(call, message):
    with pytest.raises(SkindiffError, match=message):
        call()
