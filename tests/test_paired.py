"""Paired differences between two classifiers: the point estimate is the difference of the
metrics the classifier runs log, and the bootstrap interval and the randomization test equal
slow loop-by-loop references that draw the same random numbers."""

import itertools
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, f1_score

from skindiff.classify.metrics import classification_metrics
from skindiff.errors import SkindiffError
from skindiff.paired import (
    METRICS,
    SeedGroups,
    SeedPredictions,
    fairness_gap,
    holm,
    paired_difference,
)

LABELS = ("acne", "eczema", "psoriasis", "lupus", "rosacea")


def random_seeds(rng: np.random.Generator, sizes: tuple[int, ...]) -> list[SeedPredictions]:
    """Seeds whose classifiers are right on about half and two thirds of the images; the last
    class never occurs, so the macro averages must still count it."""
    seeds = []
    for n in sizes:
        truth = rng.integers(0, len(LABELS) - 1, n)

        def guess(right: float, truth: np.ndarray = truth, n: int = n) -> np.ndarray:
            return np.where(rng.random(n) < right, truth, rng.integers(0, len(LABELS) - 1, n))

        seeds.append(SeedPredictions(truth, guess(0.5), guess(0.65), len(LABELS)))
    return seeds


def mostly_better(rng: np.random.Generator, n_seeds: int = 3, n: int = 30) -> list:
    """The candidate right and the baseline wrong on 9 of 10 images."""
    seeds = []
    for _ in range(n_seeds):
        truth = rng.integers(0, len(LABELS), n)
        wrong = (truth + 1) % len(LABELS)
        flip = rng.random(n) < 0.9
        seeds.append(
            SeedPredictions(
                truth, np.where(flip, wrong, truth), np.where(flip, truth, wrong), len(LABELS)
            )
        )
    return seeds


def sklearn_score(truth: np.ndarray, predicted: np.ndarray, metric: str) -> float:
    """The metric as `classification_metrics` computes it, in points."""
    if metric == "accuracy":
        return 100 * accuracy_score(truth, predicted)
    labels = range(len(LABELS))
    return 100 * f1_score(truth, predicted, labels=labels, average="macro", zero_division=0)


def reference_difference(truths, baselines, candidates, metric: str) -> float:
    differences = [
        sklearn_score(truth, candidate, metric) - sklearn_score(truth, baseline, metric)
        for truth, baseline, candidate in zip(truths, baselines, candidates, strict=True)
    ]
    return sum(differences) / len(differences)


def reference_p_value(observed: float, null: list[float]) -> float:
    """Two-sided as scipy's permutation_test: twice the smaller tail, each counting the
    observed value's resample (+1) since the resamples are random; ties within float noise."""
    greater = sum(value >= observed - 1e-9 for value in null)
    less = sum(value <= observed + 1e-9 for value in null)
    return min(1.0, 2 * min(greater + 1, less + 1) / (len(null) + 1))


@pytest.mark.parametrize("metric", METRICS)
def test_mean_diff_is_the_difference_of_the_logged_metrics(metric):
    seeds = random_seeds(np.random.default_rng(7), (40, 40, 40))
    logged = []
    for seed in seeds:
        scores = []
        for predicted in (seed.baseline, seed.candidate):
            frame = pd.DataFrame(
                {
                    "label": [LABELS[i] for i in seed.truth],
                    "predicted": [LABELS[i] for i in predicted],
                    "fitzpatrick_scale": 5,
                }
            )
            scores.append(classification_metrics(frame, LABELS, "test")[f"test_{metric}"])
        logged.append(100 * (scores[1] - scores[0]))

    result = paired_difference(seeds, metric, replicates=200)

    assert result.mean_diff == pytest.approx(np.mean(logged), abs=1e-6)
    assert result.ci_low <= result.mean_diff <= result.ci_high
    assert 0 < result.p_value <= 1
    assert (result.n_seeds, result.n_test_images) == (3, 40)
    same_sign = sum(np.sign(value) == np.sign(result.mean_diff) for value in logged)
    assert result.seeds_same_sign == same_sign


def test_from_labels_encodes_by_position_in_the_label_set():
    seed = SeedPredictions.from_labels(
        ["lupus", "acne"], ["acne", "acne"], ["lupus", "rosacea"], LABELS
    )
    assert seed.truth.tolist() == [3, 0]
    assert seed.baseline.tolist() == [0, 0]
    assert seed.candidate.tolist() == [3, 4]
    assert seed.n_classes == len(LABELS)


@pytest.mark.parametrize("metric", METRICS)
def test_identical_predictions_are_not_distinguishable(metric):
    seeds = [
        SeedPredictions(seed.truth, seed.baseline, seed.baseline, seed.n_classes)
        for seed in random_seeds(np.random.default_rng(1), (30, 30))
    ]
    result = paired_difference(seeds, metric, replicates=500)

    assert (result.mean_diff, result.ci_low, result.ci_high) == (0, 0, 0)
    assert result.p_value == 1
    assert result.seeds_same_sign == 0
    assert result.verdict == "not distinguishable"
    assert result.detectable_difference == 0


@pytest.mark.parametrize("metric", METRICS)
def test_a_classifier_right_where_the_other_is_wrong_is_better(metric):
    seeds = mostly_better(np.random.default_rng(2))
    better = paired_difference(seeds, metric, replicates=500)
    mirrored = [SeedPredictions(s.truth, s.candidate, s.baseline, s.n_classes) for s in seeds]
    worse = paired_difference(mirrored, metric, replicates=500)

    assert better.ci_low > 0
    assert better.verdict == "better"
    assert better.p_value < 0.01
    assert better.seeds_same_sign == 3
    assert better.detectable_difference > 0
    assert worse.ci_high < 0
    assert worse.verdict == "worse"
    assert worse.mean_diff == pytest.approx(-better.mean_diff)
    assert worse.p_value < 0.01


def one_image_apart(n: int, wrong_baseline: int, wrong_candidate: int) -> SeedPredictions:
    """The baseline wrong on the first `wrong_baseline` images, the candidate on the first
    `wrong_candidate`, both right on the rest."""
    truth = np.arange(n) % 3
    baseline, candidate = truth.copy(), truth.copy()
    baseline[:wrong_baseline] = (truth[:wrong_baseline] + 1) % 3
    candidate[:wrong_candidate] = (truth[:wrong_candidate] + 1) % 3
    return SeedPredictions(truth, baseline, candidate, 3)


def test_one_image_is_not_enough_to_tell():
    seeds = [one_image_apart(20, 1, 0), one_image_apart(20, 1, 0)]
    result = paired_difference(seeds, "accuracy", replicates=500)

    assert result.mean_diff == pytest.approx(5)
    assert result.seeds_same_sign == 2
    assert result.ci_low <= 0 < result.ci_high
    assert result.verdict == "not distinguishable"
    assert result.p_value > 0.3  # both differing images must stay unswapped: 2 x 1/4


def test_differences_that_cancel_over_seeds_average_to_zero():
    # in floats 100/6 + 100/6 - 200/6 is 4.7e-15, not 0
    seeds = [one_image_apart(6, 1, 0), one_image_apart(6, 1, 0), one_image_apart(6, 0, 2)]
    result = paired_difference(seeds, "accuracy", replicates=200)

    assert result.mean_diff == 0
    assert result.p_value == 1  # a null symmetric about 0 has at least half of it on each side
    assert result.seeds_same_sign == 0
    assert result.verdict == "not distinguishable"


@pytest.mark.parametrize("metric", METRICS)
def test_bootstrap_and_randomization_test_equal_slow_references(metric):
    replicates, random_seed = 200, 11
    seeds = random_seeds(np.random.default_rng(3), (12, 9))
    truths = [seed.truth for seed in seeds]
    baselines = [seed.baseline for seed in seeds]
    candidates = [seed.candidate for seed in seeds]

    result = paired_difference(seeds, metric, replicates, confidence=0.9, random_seed=random_seed)

    # scipy.stats.bootstrap draws, per sample (= seed) in order, one (replicates, n) array of
    # image indices from rng.integers; the reference takes the same draws. Should scipy change
    # its draws, this test fails and the reference must follow.
    rng = np.random.default_rng(random_seed)
    draws = [rng.integers(0, len(truth), (replicates, len(truth))) for truth in truths]
    distribution = []
    for replicate in range(replicates):
        drawn = [draw[replicate] for draw in draws]
        distribution.append(
            reference_difference(
                [truth[i] for truth, i in zip(truths, drawn, strict=True)],
                [baseline[i] for baseline, i in zip(baselines, drawn, strict=True)],
                [candidate[i] for candidate, i in zip(candidates, drawn, strict=True)],
                metric,
            )
        )
    low, high = np.quantile(distribution, [0.05, 0.95])
    assert (result.ci_low, result.ci_high) == pytest.approx((low, high), abs=1e-8)

    # scipy.stats.permutation_test ("samples", randomized) permutes the two predictions of
    # every image with one rng.permuted call over (replicates, images, 2); slot 0 holding index
    # 1 means the image's predictions are swapped.
    rng = np.random.default_rng(random_seed)
    n_images = sum(len(truth) for truth in truths)
    order = rng.permuted(np.tile(np.arange(2), (replicates, n_images, 1)), axis=-1)
    null = []
    for replicate in range(replicates):
        swapped_baselines, swapped_candidates, start = [], [], 0
        for baseline, candidate in zip(baselines, candidates, strict=True):
            swap = order[replicate, start : start + len(baseline), 0] == 1
            swapped_baselines.append(np.where(swap, candidate, baseline))
            swapped_candidates.append(np.where(swap, baseline, candidate))
            start += len(baseline)
        null.append(reference_difference(truths, swapped_baselines, swapped_candidates, metric))
    observed = reference_difference(truths, baselines, candidates, metric)
    assert result.mean_diff == pytest.approx(observed, abs=1e-8)
    assert result.p_value == pytest.approx(reference_p_value(observed, null), abs=1e-12)
    assert result.n_test_images == 9


def test_few_images_enumerate_every_swap():
    seeds = random_seeds(np.random.default_rng(5), (3, 4))
    result = paired_difference(seeds, "accuracy", replicates=500)

    truths = [seed.truth for seed in seeds]
    observed = reference_difference(
        truths, [s.baseline for s in seeds], [s.candidate for s in seeds], "accuracy"
    )
    null = []
    for swaps in itertools.product((False, True), repeat=7):
        swap = np.array(swaps)
        baselines = [np.where(swap[:3], seeds[0].candidate, seeds[0].baseline)]
        baselines.append(np.where(swap[3:], seeds[1].candidate, seeds[1].baseline))
        candidates = [np.where(swap[:3], seeds[0].baseline, seeds[0].candidate)]
        candidates.append(np.where(swap[3:], seeds[1].baseline, seeds[1].candidate))
        null.append(reference_difference(truths, baselines, candidates, "accuracy"))
    # exact: every one of the 2**7 swaps counted once, the observed one among them
    greater = sum(value >= observed - 1e-9 for value in null)
    less = sum(value <= observed + 1e-9 for value in null)
    assert result.p_value == pytest.approx(min(1.0, 2 * min(greater, less) / 2**7))


def test_the_same_random_seed_repeats_the_result():
    seeds = random_seeds(np.random.default_rng(4), (25, 25, 25))
    first = paired_difference(seeds, "f1_macro", replicates=300, random_seed=3)
    assert paired_difference(seeds, "f1_macro", replicates=300, random_seed=3) == first
    other = paired_difference(seeds, "f1_macro", replicates=300, random_seed=4)
    assert (other.ci_low, other.ci_high, other.p_value) != (
        first.ci_low,
        first.ci_high,
        first.p_value,
    )


def test_holm_adjusts_in_the_input_order():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.04, 0.001, 0.02, 0.03]) == pytest.approx([0.06, 0.004, 0.06, 0.06])
    assert holm([0.5, 0.6]) == [1.0, 1.0]
    assert holm([]) == []


def test_fairness_gap_equals_a_slow_reference_on_the_same_draws():
    replicates, random_seed = 200, 5
    rng = np.random.default_rng(9)
    seeds = [
        SeedGroups(light, dark)
        for light, dark in zip(random_seeds(rng, (10, 12)), random_seeds(rng, (11, 8)), strict=True)
    ]
    result = fairness_gap(seeds, replicates, confidence=0.9, random_seed=random_seed)

    def gaps(drawn: list[np.ndarray]) -> tuple[float, float, float]:
        """(baseline gap, candidate gap, |baseline gap| - |candidate gap|): means over seeds."""
        per_seed = {"baseline": [], "candidate": []}
        parts = [part for seed in seeds for part in (seed.light, seed.dark)]
        for which in per_seed:
            f1 = [
                sklearn_score(part.truth[i], getattr(part, which)[i], "f1_macro")
                for part, i in zip(parts, drawn, strict=True)
            ]
            per_seed[which] = [light - dark for light, dark in zip(f1[0::2], f1[1::2], strict=True)]
        baseline, candidate = (np.mean(values) for values in per_seed.values())
        return baseline, candidate, abs(baseline) - abs(candidate)

    sizes = [len(part.truth) for seed in seeds for part in (seed.light, seed.dark)]
    estimate = gaps([np.arange(n) for n in sizes])
    assert (result.baseline_gap, result.candidate_gap, result.narrowing) == pytest.approx(
        estimate, abs=1e-8
    )
    # one sample per (seed, group), light before dark: scipy draws each in that order
    rng = np.random.default_rng(random_seed)
    draws = [rng.integers(0, n, (replicates, n)) for n in sizes]
    distribution = np.array([gaps([d[r] for d in draws]) for r in range(replicates)])
    low, high = np.quantile(distribution, [0.05, 0.95], axis=0)
    got_low = (result.baseline_ci_low, result.candidate_ci_low, result.narrowing_ci_low)
    got_high = (result.baseline_ci_high, result.candidate_ci_high, result.narrowing_ci_high)
    assert got_low == pytest.approx(low, abs=1e-8)
    assert got_high == pytest.approx(high, abs=1e-8)
    assert (result.n_light_images, result.n_dark_images) == (10, 8)


def test_a_candidate_as_good_on_dark_as_on_light_narrows_the_gap():
    """The baseline is right on every light image and wrong on 9 of 10 dark ones; the
    candidate is right everywhere: its gap is 0, the baseline's large."""
    rng = np.random.default_rng(2)
    seeds = []
    for _ in range(3):
        light, dark = rng.integers(0, len(LABELS), 30), rng.integers(0, len(LABELS), 30)
        wrong = np.where(rng.random(30) < 0.9, (dark + 1) % len(LABELS), dark)
        seeds.append(
            SeedGroups(
                SeedPredictions(light, light, light, len(LABELS)),
                SeedPredictions(dark, wrong, dark, len(LABELS)),
            )
        )
    result = fairness_gap(seeds, replicates=500)
    # a resample may lack a class, which then scores 0 on one side: the interval is not [0, 0]
    assert result.candidate_gap == 0 and result.candidate_ci_low < 0 < result.candidate_ci_high
    assert result.baseline_ci_low > 50
    assert result.narrowing == result.baseline_gap and result.narrowing_ci_low > 0
    assert (result.verdict, result.seeds_narrowed) == ("narrowed", 3)

    # the same classifier as baseline and candidate changes nothing
    same = [SeedGroups(s.light, replace(s.dark, candidate=s.dark.baseline)) for s in seeds]
    unchanged = fairness_gap(same, replicates=500)
    assert unchanged.narrowing == unchanged.narrowing_ci_low == unchanged.narrowing_ci_high == 0
    assert (unchanged.verdict, unchanged.seeds_narrowed) == ("not distinguishable", 0)
    assert unchanged.candidate_gap == unchanged.baseline_gap == result.baseline_gap


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SeedPredictions(np.array([0, 1]), np.array([0]), np.array([0, 1]), 2), "one"),
        (lambda: SeedPredictions(np.array([0, 2]), np.array([0, 1]), np.array([0, 1]), 2), "0..1"),
        (lambda: SeedPredictions(np.array([0]), np.array([0]), np.array([0]), 2), "at least 2"),
        (lambda: SeedPredictions.from_labels(["acne"], ["mole"], ["acne"], LABELS), "mole"),
        (lambda: paired_difference(random_seeds(np.random.default_rng(0), (5,)), "auc"), "auc"),
        (lambda: fairness_gap([]), "at least one seed"),
    ],
)
def test_bad_inputs_are_named(make, message):
    with pytest.raises(SkindiffError, match=message):
        make()
