"""The report's paired statistics at the paper's full scale: 3 scenarios x 3 archs x 5 seeds,
the comparisons of 3 train types (real+syn and syn against real) on accuracy and macro F1, and
their light-minus-dark gaps, with 2000 bootstrap replicates and randomization resamples.
Baseline: the loop a reader would write, scikit-learn's scores per replicate (as the tests'
references), timed on a few replicates of one row per scenario and scaled to the report's.
Writes docs/generated/paired_statistics.md.

    python -m benchmarks.paired_statistics
"""

import argparse
import time

import numpy as np
from sklearn.metrics import f1_score
from tabulate import tabulate

from benchmarks.common import record
from skindiff import paired

N_CLASSES = 7
TEST_SIZES = {"i": 56, "ii": 291, "iii": 291}  # the paper's dark test splits
LIGHT_SIZE = 56  # the light flexible subset
ARCHS = 3
SEEDS = 5
COMPARISONS = 2


def predictions(rng: np.random.Generator, n: int) -> paired.SeedPredictions:
    truth = rng.integers(0, N_CLASSES, n)

    def guess(right: float) -> np.ndarray:
        return np.where(rng.random(n) < right, truth, rng.integers(0, N_CLASSES, n))

    return paired.SeedPredictions(truth, guess(0.5), guess(0.6), N_CLASSES)


def skindiff_way(rows: list[tuple[str, list]], replicates: int) -> float:
    """Seconds for every row's paired differences (both metrics) and light-minus-dark gap."""
    start = time.perf_counter()
    for _, seeds in rows:
        dark = [seed.dark for seed in seeds]
        for metric in paired.METRICS:
            paired.paired_difference(dark, metric, replicates)
        paired.fairness_gap(seeds, replicates)
    return time.perf_counter() - start


def loop_way(seeds: list[paired.SeedGroups], replicates: int, rng: np.random.Generator) -> float:
    """Seconds for one row's macro-F1 bootstrap, `replicates` replicates, image by image."""
    start = time.perf_counter()
    for _ in range(replicates):
        for seed in seeds:
            part = seed.dark
            drawn = rng.integers(0, len(part.truth), len(part.truth))
            for predicted in (part.baseline, part.candidate):
                f1_score(part.truth[drawn], predicted[drawn], average="macro", zero_division=0)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicates", type=int, default=2000)
    parser.add_argument("--loop-replicates", type=int, default=50)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = [
        (
            scenario,
            [
                paired.SeedGroups(predictions(rng, LIGHT_SIZE), predictions(rng, n))
                for _ in range(SEEDS)
            ],
        )
        for scenario, n in TEST_SIZES.items()
        for _ in range(ARCHS * COMPARISONS)
    ]
    fast = skindiff_way(rows, args.replicates)
    # per scenario, the loop's seconds per replicate of one metric of one row, times the
    # report's work per row: two metrics' bootstraps and randomization tests, and a gap
    # bootstrap (both groups' images: counted as two more)
    loop = 0.0
    for scenario in TEST_SIZES:
        first = next(seeds for name, seeds in rows if name == scenario)
        per_replicate = loop_way(first, args.loop_replicates, rng) / args.loop_replicates
        loop += per_replicate * args.replicates * ARCHS * COMPARISONS * (2 * 2 + 2)
    n_rows = len(rows) * len(paired.METRICS)
    text = "\n\n".join(
        [
            f"{n_rows} paired-difference rows and {len(rows)} gap rows ({len(TEST_SIZES)} "
            f"scenarios x {ARCHS} archs x {COMPARISONS} comparisons, {SEEDS} seeds, "
            f"{args.replicates} replicates):",
            tabulate(
                [
                    ["skindiff (vectorised, scipy.stats)", f"{fast:.1f}"],
                    [
                        f"loop, scikit-learn per replicate (from {args.loop_replicates} "
                        "replicates of one row per scenario, scaled)",
                        f"{loop:.0f}",
                    ],
                ],
                headers=["way", "seconds"],
                tablefmt="github",
            ),
            f"paired statistics: skindiff {loop / fast:.0f}x the loop's speed",
        ]
    )
    record("paired_statistics", text, "cpu", markdown=True)


if __name__ == "__main__":
    main()
