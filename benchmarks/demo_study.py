"""The demo's five-seed study: the quick start's settings with the paper's seeds, then the
report, and its evidence (paired differences, light-minus-dark gaps) written to
docs/generated/demo_study.md, which the README's and the docs' claims about the demo quote.

It runs the README's two commands with `-P seeds=0,42,123,1111,1234` in `--folder` (default
$SKINDIFF_BENCH_DIR/demo-study, /tmp/skindiff-bench/demo-study: its tracking store and cache,
so that a second call, or a call after a kill, re-uses every finished run), then writes the
tables of the report's CSV files.

    python -m benchmarks.demo_study      # five times the one-seed demo's time on its first call
"""

import argparse
import os
import time
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from benchmarks.common import record
from benchmarks.end_to_end import mlflow_run, scores_table, stage_seconds
from skindiff.report import (
    FAIRNESS_FILE,
    PAIRED_FILE,
    detectable_differences,
    fairness_markdown,
    near_duplicate_markdown,
    paired_markdown,
)

SEEDS = "0,42,123,1111,1234"  # the reference code's
SCORES = "scores_classifiers.csv"
NEAR_DUPLICATES = "near_duplicates.csv"


def run_study(folder: Path) -> tuple[Path, float]:
    """Runs the demo with SEEDS and the report in `folder`; returns the report's folder and
    the minutes its stage runs took, summed (what a first call costs, without the reuse)."""
    folder.mkdir(parents=True, exist_ok=True)
    env = os.environ | {
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder.resolve() / 'mlflow.db'}",
        "SKINDIFF_CACHE": str(folder.resolve() / "cache"),
    }
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    mlflow_run("demo", folder, env, "-P", f"seeds={SEEDS}")
    report = folder.resolve() / "report"
    mlflow_run("report", folder, env, "-P", f"output_dir={report}")
    return report, sum(stage_seconds(env["MLFLOW_TRACKING_URI"]).values()) / 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench = Path(os.environ.get("SKINDIFF_BENCH_DIR", "/tmp/skindiff-bench"))
    parser.add_argument("--folder", type=Path, default=bench / "demo-study")
    parser.add_argument(
        "--tables-only",
        action="store_true",
        help="write the page from the study and report already in --folder, running nothing",
    )
    args = parser.parse_args()
    start = time.perf_counter()
    if args.tables_only:
        report = args.folder.resolve() / "report"
        uri = f"sqlite:///{args.folder.resolve() / 'mlflow.db'}"
        stage_minutes = sum(stage_seconds(uri).values()) / 60
    else:
        report, stage_minutes = run_study(args.folder)
    minutes = (time.perf_counter() - start) / 60
    paired = pd.read_csv(report / f"{PAIRED_FILE}.csv")
    gaps = pd.read_csv(report / f"{FAIRNESS_FILE}.csv")
    scores = pd.read_csv(report / SCORES)
    copies = pd.read_csv(report / NEAR_DUPLICATES)
    seeds = sorted(scores["seed"].unique())
    this_call = (
        "these tables were written from that study's report (`--tables-only`)"
        if args.tables_only
        else f"this call {minutes:.0f} min (a call re-uses the finished runs it finds)"
    )
    text = "\n\n".join(
        [
            f"The demo (`-e demo`, the quick start's settings) with seeds "
            f"{', '.join(map(str, seeds))}, then `-e report`. Its stage runs took "
            f"{stage_minutes:.0f} min in all, on this machine and beside whatever else ran; "
            f"{this_call}.",
            "Dark-test scores, the mean over seeds (the report's `scores_classifiers.csv`; "
            "7 classes, chance 14.3% accuracy):",
            scores_table(scores),
            "Is the difference real? The report's `paired_differences.csv` (candidate minus "
            "baseline in points, mean over seeds, 95% percentile bootstrap interval over the "
            "test images within each seed, paired randomization test, Holm over a scenario's "
            "rows; `paper` is the difference of the paper's means for VGG-16 and is not "
            "comparable: another model, data and size):",
            paired_markdown(paired),
            "The smallest difference these test splits and seeds could detect, the median "
            f"half-width of the rows' intervals (points): {detectable_differences(paired)}.",
            "Light-minus-dark macro-F1 gap (the report's `fairness_gap.csv`: each classifier "
            "also scored on its seed's 56-image light flexible subset):",
            fairness_markdown(gaps),
            tabulate(
                [[len(seeds), paired["n_test_images"].min(), gaps["n_light_images"].min()]],
                headers=["seeds", "dark test images per seed (min)", "light images per seed"],
                tablefmt="github",
            ),
            "Near-duplicates (the report's `near_duplicates.csv`, from the prepare runs): test "
            "images with one of the demo's planted copies in training or validation, the mean "
            "over seeds; `near_duplicates report` left them there:",
            near_duplicate_markdown(copies),
        ]
    )
    record("demo_study", text, "cpu", markdown=True)


if __name__ == "__main__":
    main()
