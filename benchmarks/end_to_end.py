"""The demo (the README's quick start), end to end: wall time per stage, read from its MLflow
runs, on a quiet machine and beside one busy process (a neighbour spinning on one core), then
the report's dark-test scores, and the plan `skindiff demo --dry-run` prints before the
demo (every stage `run`) and after it (every stage `re-use`). Writes
docs/generated/quickstart.md.

It runs the README's two commands, `mlflow run <repo> -e demo --env-manager local
--experiment-name skindiff` (the demo's settings are built into its entry point) and then the
`report` entry point, in a fresh folder with a fresh cache (the demo data is drawn, as on first
use; nothing is installed).

    python -m benchmarks.end_to_end                     # quiet, then with a busy neighbour
    python -m benchmarks.end_to_end --neighbour none    # quiet only
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import torch
from tabulate import tabulate

from benchmarks.common import bench_folder, record
from skindiff.report import SCENARIO_TABLE, TRAIN_TYPES

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "skindiff"
ENTRY_POINT_TAG = "mlflow.project.entryPoint"
CONTAINERS = ("demo", "main")  # runs that hold the stage runs, timed as the whole command
SCORES = "scores_classifiers.csv"  # the report's file of one row per classifier run
SPIN = "while True: pass"


def mlflow_run(entry_point: str, folder: Path, env: dict[str, str], *options: str) -> float:
    """Wall seconds of `mlflow run <repo> -e <entry_point>`, as the README gives it."""
    command = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", entry_point]
    command += ["--env-manager", "local", "--experiment-name", EXPERIMENT, *options]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def stage_seconds(tracking_uri: str) -> dict[str, float]:
    """Seconds per stage, summed over the stage's finished runs."""
    client = mlflow.MlflowClient(tracking_uri)
    stages: dict[str, float] = {}
    experiments = [e.experiment_id for e in client.search_experiments()]
    for run in client.search_runs(experiments, max_results=5000):
        stage = run.data.tags.get(ENTRY_POINT_TAG, "?")
        if stage not in CONTAINERS and run.info.end_time:
            stages[stage] = stages.get(stage, 0.0) + (run.info.end_time - run.info.start_time) / 1e3
    return stages


def dry_run(folder: Path, env: dict[str, str]) -> str:
    """The summary of `skindiff demo --dry-run` (its stage counts and totals), with its
    wall time."""
    command = [sys.executable, "-c", "from skindiff.cli import run; run()", "demo"]
    command += ["--dry-run", "--experiment-name", EXPERIMENT]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith(("stage runs", "total"))]
    return "\n".join([*lines, f"(the dry run took {wall:.0f} s)"])


def run_demo(
    folder: Path, busy: bool
) -> tuple[float, dict[str, float], float, pd.DataFrame, tuple[str, str]]:
    """(demo wall seconds, seconds per stage, report wall seconds, the report's scores, the
    dry run's summary before and after the demo)."""
    folder.mkdir()
    env = os.environ | {
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
        "SKINDIFF_CACHE": str(folder / "cache"),
    }
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    neighbour = subprocess.Popen([sys.executable, "-c", SPIN]) if busy else None
    try:
        before = dry_run(folder, env)
        wall = mlflow_run("demo", folder, env)
        after = dry_run(folder, env)
    finally:
        if neighbour is not None:
            neighbour.kill()
    stages = stage_seconds(env["MLFLOW_TRACKING_URI"])
    # The entry point runs in the repository: the report goes to this folder, not ./report.
    report = folder / "report"
    report_wall = mlflow_run("report", folder, env, "-P", f"output_dir={report}")
    return wall, stages, report_wall, pd.read_csv(report / SCORES), (before, after)


def scores_table(scores: pd.DataFrame) -> str:
    """Dark-test accuracy and macro-F1 (percent, mean over seeds) per scenario, arch and
    training set, in the report's order."""
    means = scores.groupby(["scenario", "arch", "train_type"])[["accuracy", "f1"]].mean() * 100
    seeds = scores.groupby(["scenario", "arch", "train_type"])["seed"].nunique()
    order = {name: k for k, name in enumerate([*SCENARIO_TABLE, *TRAIN_TYPES])}
    keys = sorted(means.index, key=lambda key: [order.get(part, len(order)) for part in key])
    rows = [
        [*key, seeds[key], f"{means.loc[key, 'accuracy']:.1f}", f"{means.loc[key, 'f1']:.1f}"]
        for key in keys
    ]
    return tabulate(
        rows,
        headers=["scenario", "arch", "train type", "seeds", "accuracy %", "macro-F1 %"],
        tablefmt="github",
        disable_numparse=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neighbour", choices=("none", "busy", "both"), default="both")
    args = parser.parse_args()
    folder = bench_folder("end-to-end")
    kinds = {"none": [False], "busy": [True], "both": [False, True]}[args.neighbour]
    results = {busy: run_demo(folder / ("busy" if busy else "quiet"), busy) for busy in kinds}
    names = {False: "quiet s", True: "busy neighbour s"}
    stages = sorted({stage for _, per_stage, *_ in results.values() for stage in per_stage})
    rows = [[stage] + [f"{results[b][1].get(stage, 0):.0f}" for b in kinds] for stage in stages]
    rows.append(["whole demo command (wall)"] + [f"{results[b][0]:.0f}" for b in kinds])
    rows.append(["report command (wall)"] + [f"{results[b][2]:.0f}" for b in kinds])
    minutes = {b: results[b][0] / 60 for b in kinds}
    line = "end to end: demo " + ", ".join(
        f"{minutes[b]:.1f} min {'with a busy neighbour' if b else 'quiet'}" for b in kinds
    )
    if len(kinds) == 2:
        line += f" (busy/quiet {minutes[True] / minutes[False]:.2f}x)"
    scores = scores_table(results[kinds[0]][3])
    same = all(scores_table(results[b][3]) == scores for b in kinds)
    text = "\n\n".join(
        [
            f"Wall time of the demo's stages (all the runs of each), {os.cpu_count()} cores:",
            tabulate(
                rows,
                headers=["stage", *(names[b] for b in kinds)],
                tablefmt="github",
                disable_numparse=True,
            ),
            line,
            "The report's dark-test scores (its `scores_classifiers.csv`; 7 classes, chance "
            f"14.3% accuracy){'' if same else ', of the quiet run (the busy one differs)'}:",
            scores,
            "The quick start's plan (`skindiff demo --dry-run`, in the same folder), "
            "before the demo and after it:",
            "```text\n{}\n\n{}\n```".format(*results[kinds[0]][4]),
        ]
    )
    record("quickstart", text, "cuda" if torch.cuda.is_available() else "cpu", markdown=True)


if __name__ == "__main__":
    main()
