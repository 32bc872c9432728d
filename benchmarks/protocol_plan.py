"""The paper's protocol as a dry run: what `main`, `tune` and `ablation` with the paper's
defaults would run, with the totals (training steps, images, UNet evaluations and FLOPs of SD
2.1 base, classifier image-epochs). Writes docs/generated/protocol_plan.md.

The base model is `sd21-random` (SD 2.1 base's configs, so its FLOPs), the data the demo's:
the training steps and their FLOPs do not depend on the data, the images generated and the
classifiers' image-epochs grow with the training splits (Fitzpatrick17k's are larger). The
classifiers are planned without ImageNet weight files (`--weights none`), which changes no
cost. Nothing runs: a fresh tracking database, so every stage is `run`.

    python -m benchmarks.protocol_plan
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import record

COMMANDS = {
    "main": ["main", "--weights", "none"],
    "tune (10 trials)": ["tune", "--weights", "none"],
    "ablation": ["ablation", "--weights", "none"],
}


def dry_run(args: list[str], folder: Path) -> str:
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    cli = [sys.executable, "-c", "from skindiff.cli import run; run()", *args]
    cli += ["--base-model", "sd21-random", "--dry-run"]
    done = subprocess.run(cli, capture_output=True, text=True, env=env, cwd=folder, check=True)
    return done.stdout


def main() -> None:
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, args in COMMANDS.items():
            out = dry_run(args, Path(tmp))
            summary = [
                line for line in out.splitlines() if line.startswith(("stage runs", "total"))
            ]
            sections.append(f"{name}:\n" + "\n".join(summary))
    record("protocol_plan", "\n\n".join(sections), "cpu")


if __name__ == "__main__":
    main()
