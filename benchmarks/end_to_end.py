"""The README's quick start, end to end: wall time per stage, read from its MLflow runs, on a
quiet machine and beside one busy process (a neighbour spinning on one core).

It runs the quick start's `mlflow run` command as the README gives it (its `-P` options), in a
fresh folder with a fresh cache (the demo data is drawn, as on first use; nothing is installed).

    python -m benchmarks.end_to_end                     # quiet, then with a busy neighbour
    python -m benchmarks.end_to_end --neighbour none    # quiet only
"""

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import mlflow
from tabulate import tabulate

from benchmarks.common import bench_folder

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINT_TAG = "mlflow.project.entryPoint"
SPIN = "while True: pass"


def quick_start_options() -> list[str]:
    """The `-P name=value` options of the README's quick start command."""
    readme = (REPO / "README.md").read_text()
    command = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [f"-P {name}={value}" for name, value in re.findall(r"-P (\w+)=(\S+)", command)]


def run_quick_start(folder: Path, busy: bool) -> tuple[float, dict[str, float]]:
    """(wall seconds, seconds per stage summed over its runs) of one quick start."""
    folder.mkdir()
    env = os.environ | {
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
        "SKINDIFF_CACHE": str(folder / "cache"),
    }
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    command = [sys.executable, "-m", "mlflow", "run", str(REPO), "--env-manager", "local"]
    command += [part for option in quick_start_options() for part in option.split(" ", 1)]
    neighbour = subprocess.Popen([sys.executable, "-c", SPIN]) if busy else None
    start = time.perf_counter()
    try:
        subprocess.run(command, cwd=folder, env=env, check=True, capture_output=True)
    finally:
        if neighbour is not None:
            neighbour.kill()
    wall = time.perf_counter() - start
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    stages: dict[str, float] = {}
    experiments = [e.experiment_id for e in client.search_experiments()]
    for run in client.search_runs(experiments, max_results=5000):
        stage = run.data.tags.get(ENTRY_POINT_TAG, "?")
        if stage != "main" and run.info.end_time:
            stages[stage] = stages.get(stage, 0.0) + (run.info.end_time - run.info.start_time) / 1e3
    return wall, stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neighbour", choices=("none", "busy", "both"), default="both")
    args = parser.parse_args()
    folder = bench_folder("end-to-end")
    kinds = {"none": [False], "busy": [True], "both": [False, True]}[args.neighbour]
    results = {
        busy: run_quick_start(folder / ("busy" if busy else "quiet"), busy) for busy in kinds
    }
    names = {False: "quiet s", True: "busy neighbour s"}
    stages = sorted({stage for _, per_stage in results.values() for stage in per_stage})
    rows = [[stage] + [f"{results[b][1].get(stage, 0):.0f}" for b in kinds] for stage in stages]
    rows.append(["whole command (wall)"] + [f"{results[b][0]:.0f}" for b in kinds])
    print(f"\nquick start ({' '.join(quick_start_options())}), {os.cpu_count()} cores")
    print(tabulate(rows, headers=["stage (all its runs)"] + [names[b] for b in kinds]))
    minutes = {b: results[b][0] / 60 for b in kinds}
    line = "end to end: quick start " + ", ".join(
        f"{minutes[b]:.1f} min {'with a busy neighbour' if b else 'quiet'}" for b in kinds
    )
    if len(kinds) == 2:
        line += f" (busy/quiet {minutes[True] / minutes[False]:.2f}x)"
    print(line)


if __name__ == "__main__":
    main()
