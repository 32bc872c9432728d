"""Is a difference between two classifiers real? Paired statistics over seeds and test images.

Two classifiers (a baseline, e.g. `real`, and a candidate, e.g. `real+syn`) are scored on the
same test images within each seed. A difference is the candidate's score minus the baseline's,
in percentage points, so a positive difference means the candidate is better. It is averaged
over seeds with equal weight per seed, as the report's means over seeds are.

The metrics are the ones the classifier runs log (`skindiff.classify.metrics`): accuracy, and
macro F1 averaged over ALL classes of the label set, a class without true or predicted images
in a (resampled) test set scoring 0 (scikit-learn's `labels=...`, `zero_division=0`).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from skindiff.errors import require

METRICS = ("accuracy", "f1_macro")
BETTER, WORSE, NOT_DISTINGUISHABLE = "better", "worse", "not distinguishable"
NARROWED, WIDENED = "narrowed", "widened"
# statistics are rounded to this many decimals of a point: float noise (~1e-13) lies below,
# the smallest real difference (about 100 / (4 n^2 classes seeds) for n images) far above
DECIMALS = 9


@dataclass(frozen=True)
class SeedPredictions:
    """One seed's test images: true labels and the two classifiers' predicted labels, as class
    indices 0..n_classes-1 in the same image order."""

    truth: np.ndarray
    baseline: np.ndarray
    candidate: np.ndarray
    n_classes: int

    def __post_init__(self) -> None:
        arrays = {"truth": self.truth, "baseline": self.baseline, "candidate": self.candidate}
        for name, values in arrays.items():
            values = np.asarray(values)
            require(
                values.ndim == 1 and np.issubdtype(values.dtype, np.integer),
                f"{name} must be a 1-D array of class indices",
            )
            require(
                values.size == 0 or (values.min() >= 0 and values.max() < self.n_classes),
                f"{name} holds a class index outside 0..{self.n_classes - 1}",
            )
            object.__setattr__(self, name, values)
        require(
            len(self.truth) == len(self.baseline) == len(self.candidate),
            "truth, baseline and candidate must hold one label per test image each",
        )
        # scipy's bootstrap cannot resample fewer than 2 observations
        require(len(self.truth) >= 2, "a seed needs at least 2 test images")

    @classmethod
    def from_labels(
        cls,
        truth: Sequence[str],
        baseline: Sequence[str],
        candidate: Sequence[str],
        labels: Sequence[str],
    ) -> "SeedPredictions":
        """From label names; `labels` is the whole label set the runs were scored on."""
        index = {label: position for position, label in enumerate(labels)}

        def encode(values: Sequence[str], name: str) -> np.ndarray:
            unknown = sorted(set(values) - index.keys())
            require(not unknown, f"{name} holds labels outside the label set: {unknown}")
            return np.array([index[value] for value in values], dtype=np.intp)

        return cls(
            encode(truth, "truth"),
            encode(baseline, "baseline"),
            encode(candidate, "candidate"),
            len(index),
        )


@dataclass(frozen=True)
class PairedDifference:
    """Candidate minus baseline on one metric, in points. The field names are the report's
    `paired_differences.csv` columns."""

    metric: str
    n_seeds: int
    n_test_images: int  # per seed; the smallest seed's when the seeds' test splits differ
    mean_diff: float
    ci_low: float
    ci_high: float
    p_value: float  # not corrected for the other comparisons of a table: see `holm`
    seeds_same_sign: int  # seeds whose difference has mean_diff's sign; a zero never does
    verdict: str  # `better` / `worse` when the interval lies above / below 0

    @property
    def detectable_difference(self) -> float:
        """Half-width of the interval: differences much smaller than this cannot be told from
        noise with these test splits and seeds."""
        return (self.ci_high - self.ci_low) / 2


def paired_difference(
    seeds: Sequence[SeedPredictions],
    metric: str,
    replicates: int = 2000,
    confidence: float = 0.95,
    random_seed: int = 0,
) -> PairedDifference:
    """The mean over seeds of the candidate's minus the baseline's `metric`, with a paired
    bootstrap interval and a paired randomization test.

    Interval: `scipy.stats.bootstrap` with one sample per seed, each the seed's test image
    indices; unpaired samples are resampled independently, so every replicate draws the images
    within each seed (a bootstrap stratified by seed, as the design is) and both classifiers
    are scored on the same draw. Percentile interval, not BCa: the statistic is discrete (an
    accuracy moves in steps of 100/n points), so many replicates tie with the estimate and
    BCa's bias correction, estimated from the share of replicates below the estimate, is
    unstable, and undefined (NaN) when the two classifiers agree everywhere; the percentile
    interval is then [0, 0].

    p-value: `scipy.stats.permutation_test` with `permutation_type="samples"`, each test image
    a pair whose two predictions are swapped with probability 1/2, independently per image
    within its seed; two-sided, statistic = the mean difference over seeds. It is randomized
    with `replicates` resamples (p >= 1/(replicates+1)) unless 2**(images of all seeds) <=
    replicates, when scipy enumerates every swap exactly. Identical predictions give p = 1.

    Verdict: from the interval alone (strictly above or below 0), at `confidence` for this
    row, not corrected for the other rows of a table; the p-value beside it, and its Holm
    correction over the table (`holm`), says how surprising the difference is if the two
    classifiers were exchangeable. The two can disagree at the edge (an interval touching 0
    beside p near 0.05): they are different procedures.

    The interval and the test each draw from a fresh `numpy.random.default_rng(random_seed)`,
    so the result repeats exactly for the same inputs.
    """
    require(metric in METRICS, f"metric must be one of {METRICS}, not {metric!r}")
    require(len(seeds) > 0, "paired_difference needs at least one seed")
    require(int(replicates) == replicates >= 1, "replicates must be a positive integer")
    require(0 < confidence < 1, "confidence must lie between 0 and 1")

    # a classifier's scores on any reweighting of a seed's test images (resampled or swapped)
    # are functions of `weights @ indicators`: per-class true positives and 2TP + FP + FN
    baselines = [_indicators(seed.truth, seed.baseline, seed.n_classes) for seed in seeds]
    candidates = [_indicators(seed.truth, seed.candidate, seed.n_classes) for seed in seeds]
    per_seed = [
        _difference(baseline.sum(axis=0), candidate.sum(axis=0), metric)
        for baseline, candidate in zip(baselines, candidates, strict=True)
    ]
    mean_diff = _points(_mean_over_seeds(per_seed))
    seed_signs = np.sign(np.round(per_seed, DECIMALS))

    def resampled(counts: Sequence[np.ndarray]) -> np.ndarray:
        parts = zip(counts, baselines, candidates, strict=True)
        return _mean_over_seeds([_difference(c @ b, c @ d, metric) for c, b, d in parts])

    sizes = [len(seed.truth) for seed in seeds]
    interval = _bootstrap_interval(sizes, resampled, replicates, confidence, random_seed)

    bounds = np.cumsum([len(seed.truth) for seed in seeds])[:-1]

    def swapped(first: np.ndarray, second: np.ndarray, axis: int) -> np.ndarray:
        # an image is swapped where the first (baseline) slot no longer holds the baseline's
        # prediction (where both classifiers predict alike a swap changes nothing), so the
        # second slot adds nothing
        differences = []
        parts = zip(np.split(first, bounds, axis=-1), seeds, baselines, candidates, strict=True)
        for slot, seed, baseline, candidate in parts:
            change = (slot != seed.baseline) @ (baseline - candidate)
            differences.append(
                _difference(baseline.sum(axis=0) - change, candidate.sum(axis=0) + change, metric)
            )
        return _mean_over_seeds(differences)

    p_value = stats.permutation_test(
        [
            np.concatenate([seed.baseline for seed in seeds]),
            np.concatenate([seed.candidate for seed in seeds]),
        ],
        swapped,
        permutation_type="samples",
        vectorized=True,
        n_resamples=replicates,
        rng=np.random.default_rng(random_seed),
    ).pvalue

    ci_low, ci_high = _points(interval.low), _points(interval.high)
    verdict = BETTER if ci_low > 0 else WORSE if ci_high < 0 else NOT_DISTINGUISHABLE
    return PairedDifference(
        metric=metric,
        n_seeds=len(seeds),
        n_test_images=min(len(seed.truth) for seed in seeds),
        mean_diff=mean_diff,
        ci_low=ci_low,
        ci_high=ci_high,
        p_value=float(p_value),
        seeds_same_sign=int(np.sum(seed_signs == np.sign(mean_diff))) if mean_diff else 0,
        verdict=verdict,
    )


@dataclass(frozen=True)
class SeedGroups:
    """One seed's light-skinned and dark-skinned test images, each scored by both classifiers."""

    light: SeedPredictions
    dark: SeedPredictions


@dataclass(frozen=True)
class FairnessGap:
    """The light-minus-dark macro-F1 gap of a baseline and a candidate classifier, in points
    (mean over seeds), and how much the candidate narrowed it: |baseline gap| - |candidate
    gap|, positive where the candidate's gap is closer to 0. Each with its interval. The field
    names are the report's `fairness_gap.csv` columns."""

    n_seeds: int
    n_light_images: int  # per seed; the smallest seed's
    n_dark_images: int
    baseline_gap: float
    baseline_ci_low: float
    baseline_ci_high: float
    candidate_gap: float
    candidate_ci_low: float
    candidate_ci_high: float
    narrowing: float
    narrowing_ci_low: float
    narrowing_ci_high: float
    seeds_narrowed: int  # seeds where the candidate's own gap is closer to 0 than the baseline's
    verdict: str  # `narrowed` / `widened` when narrowing's interval lies above / below 0


def fairness_gap(
    seeds: Sequence[SeedGroups],
    replicates: int = 2000,
    confidence: float = 0.95,
    random_seed: int = 0,
) -> FairnessGap:
    """Light-minus-dark macro F1 of two classifiers, and whether the candidate narrowed it.

    The light and the dark images are different images, so the interval is a bootstrap
    stratified by seed and by group: every replicate resamples each seed's light images and
    its dark images on their own, and scores both classifiers on the same draw, so the three
    statistics (two gaps and the narrowing) come from one set of replicates. Percentile
    interval, for the reasons `paired_difference` gives. Reproducible from `random_seed`."""
    require(len(seeds) > 0, "fairness_gap needs at least one seed")
    require(int(replicates) == replicates >= 1, "replicates must be a positive integer")
    require(0 < confidence < 1, "confidence must lie between 0 and 1")
    strata = [part for seed in seeds for part in (seed.light, seed.dark)]
    baselines = [_indicators(s.truth, s.baseline, s.n_classes) for s in strata]
    candidates = [_indicators(s.truth, s.candidate, s.n_classes) for s in strata]

    def per_seed_gaps(counts: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(baseline, candidate) gaps per seed (first axis), from each stratum's draw counts."""
        gaps = []
        for indicators in (baselines, candidates):
            f1 = [_score(c @ i, "f1_macro") for c, i in zip(counts, indicators, strict=True)]
            gaps.append(np.array(f1[0::2]) - np.array(f1[1::2]))
        return gaps[0], gaps[1]

    def statistics(counts: Sequence[np.ndarray]) -> np.ndarray:
        baseline, candidate = per_seed_gaps(counts)
        baseline, candidate = _mean_over_seeds(baseline), _mean_over_seeds(candidate)
        return np.stack([baseline, candidate, np.abs(baseline) - np.abs(candidate)])

    everything = [np.ones(len(s.truth)) for s in strata]
    estimate = statistics(everything)

    sizes = [len(s.truth) for s in strata]
    interval = _bootstrap_interval(sizes, statistics, replicates, confidence, random_seed)
    low, high = [[_points(v) for v in bound] for bound in (interval.low, interval.high)]
    baseline_seeds, candidate_seeds = per_seed_gaps(everything)
    narrowed = np.round(np.abs(baseline_seeds) - np.abs(candidate_seeds), DECIMALS) > 0
    verdict = NARROWED if low[2] > 0 else WIDENED if high[2] < 0 else NOT_DISTINGUISHABLE
    return FairnessGap(
        n_seeds=len(seeds),
        n_light_images=min(len(seed.light.truth) for seed in seeds),
        n_dark_images=min(len(seed.dark.truth) for seed in seeds),
        baseline_gap=_points(estimate[0]),
        baseline_ci_low=low[0],
        baseline_ci_high=high[0],
        candidate_gap=_points(estimate[1]),
        candidate_ci_low=low[1],
        candidate_ci_high=high[1],
        narrowing=_points(estimate[2]),
        narrowing_ci_low=low[2],
        narrowing_ci_high=high[2],
        seeds_narrowed=int(narrowed.sum()),
        verdict=verdict,
    )


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input's order: the k-th smallest of m is
    multiplied by m-k+1, then made non-decreasing in that order and capped at 1."""
    order = np.argsort(p_values, kind="stable")
    scaled = np.asarray(p_values, dtype=float)[order] * (len(order) - np.arange(len(order)))
    adjusted = np.empty(len(order))
    adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return adjusted.tolist()


def _bootstrap_interval(
    sizes: Sequence[int],
    statistic: Callable[[Sequence[np.ndarray]], np.ndarray],
    replicates: int,
    confidence: float,
    random_seed: int,
):
    """`scipy.stats.bootstrap`'s percentile interval of `statistic(counts)`, where counts holds
    per stratum (of `sizes` images) how often each image was drawn in each replicate (last
    axis): one sample per stratum, each resampled on its own."""

    def resampled(*indices: np.ndarray, axis: int) -> np.ndarray:
        parts = zip(indices, sizes, strict=True)
        return statistic([_draw_counts(drawn, n) for drawn, n in parts])

    return stats.bootstrap(
        [np.arange(n) for n in sizes],
        resampled,
        n_resamples=replicates,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(random_seed),
    ).confidence_interval


def _difference(
    baseline_counts: np.ndarray, candidate_counts: np.ndarray, metric: str
) -> np.ndarray:
    """Candidate's minus baseline's metric, from summed `_indicators`."""
    return _score(candidate_counts, metric) - _score(baseline_counts, metric)


def _mean_over_seeds(differences: Sequence[np.ndarray]) -> np.ndarray:
    """Rounded to DECIMALS so that values equal in exact arithmetic (a zero difference, ties
    between replicates) are equal: float noise must not turn an interval's 0 into a verdict."""
    return np.round(np.mean(differences, axis=0), DECIMALS)


def _points(value: float) -> float:
    """A reported value: rounded like the statistic, and never -0.0."""
    return float(np.round(value, DECIMALS)) + 0.0


def _indicators(truth: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """Per image: one-hot of its class if predicted correctly (true positives), then one-hot
    of its true plus one-hot of its predicted class (2TP + FP + FN summed over images)."""
    one_hot = np.eye(n_classes)
    correct = (truth == predicted)[:, None]
    return np.hstack([one_hot[truth] * correct, one_hot[truth] + one_hot[predicted]])


def _draw_counts(drawn: np.ndarray, n_images: int) -> np.ndarray:
    """How often each image was drawn, per row of image indices."""
    rows = drawn.reshape(-1, n_images)
    flat = (rows + n_images * np.arange(len(rows))[:, None]).ravel()
    counts = np.bincount(flat, minlength=rows.size).reshape(rows.shape)
    return counts.reshape(drawn.shape)


def _score(counts: np.ndarray, metric: str) -> np.ndarray:
    """`metric` in points from summed `_indicators` (last axis)."""
    true_positives, denominator = np.split(counts, 2, axis=-1)
    if metric == "accuracy":
        # every image adds 1 to the denominator twice (true and predicted class)
        return 100 * true_positives.sum(axis=-1) / (denominator.sum(axis=-1) / 2)
    f1 = np.divide(
        2 * true_positives, denominator, out=np.zeros(denominator.shape), where=denominator > 0
    )
    return 100 * f1.mean(axis=-1)
