"""What the benchmarks share: timing a phase with its peak memory, the table, the ratio line,
the record of what a benchmark printed (docs/generated/<name>.md, which the documentation
includes), and the inputs (demo training rows, Textual Inversion tokens and a LoRA adapter) they
run on.

Every benchmark runs its baseline and skindiff's way in one process, on the same model, data
and hardware, and prints the speed ratio on its last line.
"""

import argparse
import os
import platform
import shlex
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import pandas as pd
import psutil
import torch
from tabulate import tabulate

from skindiff.data.config import PrepareConfig
from skindiff.data.prepare import prepare_scenario

# The documentation includes these files (docs/speed.md, docs/quickstart.md): numbers that move
# with the code are written here by what measures them, never typed into a page.
GENERATED = Path(__file__).resolve().parents[1] / "docs" / "generated"


@dataclass(frozen=True)
class Measurement:
    name: str
    seconds: float
    items: int  # images, steps or epochs done in `seconds`
    unit: str
    peak_mb: float  # CUDA: max allocated; CPU: the process's resident set, sampled

    @property
    def rate(self) -> float:
        return self.items / self.seconds


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base-model", default="tiny", help="tiny, sd21-random, a folder or hub id"
    )
    parser.add_argument("--resolution", type=int, default=0, help="0: the model's native size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mixed-precision", default="auto", help="no, fp16, bf16 or auto")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="rounds of the ways, taken in turn; each way shows its median round",
    )


def measure(
    name: str, run: Callable[[], None], items: int, unit: str, device: torch.device
) -> Measurement:
    """Times `run()` once (after any warm-up the caller did) and records its peak memory."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    sampler = _RssSampler()
    start = time.perf_counter()
    with sampler:
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else sampler.peak
    return Measurement(name, seconds, items, unit, peak / 2**20)


def measure_rounds(
    ways: dict[str, Callable[[Path], None]],
    repeats: int,
    items: int,
    unit: str,
    device: torch.device,
    folder: Path,
) -> list[Measurement]:
    """Each way's median round of `repeats`: `run(out)` with a fresh folder `out` each time.
    The ways take turns, so that they share whatever else the machine is doing, and the median
    drops a round that a busy neighbour slowed down (this project's CPUs move by 10-30%)."""
    rounds: dict[str, list[Measurement]] = {name: [] for name in ways}
    for r in range(repeats):
        for k, (name, run) in enumerate(ways.items()):
            out = folder / f"way{k}-round{r}"
            rounds[name].append(measure(name, partial(run, out), items, unit, device))
    return [
        sorted(times, key=lambda m: m.seconds)[(len(times) - 1) // 2] for times in rounds.values()
    ]


class _RssSampler:
    """The highest resident set size of this process while the block runs (polled)."""

    def __init__(self, every: float = 0.02):
        self.every = every
        self.peak = 0
        self._stop = threading.Event()
        self._process = psutil.Process(os.getpid())

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(self.every)

    def __enter__(self) -> "_RssSampler":
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def table(title: str, measurements: list[Measurement]) -> str:
    rows = [
        [m.name, f"{m.seconds:.2f}", f"{m.rate:.3f} {m.unit}/s", f"{m.peak_mb:.0f}"]
        for m in measurements
    ]
    return f"{title}\n{tabulate(rows, headers=['way', 'wall s', 'throughput', 'peak MB'])}"


def ratio_line(what: str, fast: Measurement, baseline: Measurement) -> str:
    return f"{what}: skindiff {fast.rate / baseline.rate:.2f}x the baseline's {fast.unit}/s"


def machine(device: torch.device | str) -> str:
    """The hardware a number was measured on: CPU count and model, the device, torch."""
    cpuinfo = Path("/proc/cpuinfo")
    models = [
        line.split(":", 1)[1].strip()
        for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
        if line.startswith("model name")
    ]
    cpu = models[0] if models else platform.processor() or platform.machine()
    device = torch.device(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{os.cpu_count()} CPUs ({cpu}), device {where}, torch {torch.__version__}"


def record(
    name: str,
    text: str,
    device: torch.device | str,
    *,
    markdown: bool = False,
    folder: Path = GENERATED,
) -> Path:
    """Prints what a benchmark measured and writes it to `folder`/<name>.md (<name>-cuda.md
    from a GPU, so that GPU numbers do not replace the CPU ones), under a line saying which
    command wrote it, when and on what. Plain text goes into a code block; `markdown` text
    (tables in Markdown) as it is."""
    print(f"\n{text}")
    device = torch.device(device)
    path = folder / f"{name}{'' if device.type == 'cpu' else '-' + device.type}.md"
    module = f"benchmarks.{Path(sys.argv[0]).stem}"  # run as `python -m benchmarks.<name>`
    command = shlex.join(["python", "-m", module, *sys.argv[1:]])
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = text if markdown else f"```text\n{text}\n```"
    header = f"*Written by `{command}` on {when}: {machine(device)}.*"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{header}\n\n{body}\n")
    print(f"wrote {path}", file=sys.stderr)
    return path


def demo_training_rows(per_condition: int | None = None) -> pd.DataFrame:
    """Scenario i's training rows of the embedded demo dataset (its images are written on
    first use); with `per_condition`, only that many of each condition."""
    train = prepare_scenario(PrepareConfig(scenario="i", seed=0, val_fraction=0)).splits.train
    if per_condition is not None:
        train = train.groupby("label", sort=True).head(per_condition)
    return train.reset_index(drop=True)


def bench_folder(name: str) -> Path:
    """A fresh folder for a benchmark's outputs (under $SKINDIFF_BENCH_DIR or /tmp)."""
    root = Path(os.environ.get("SKINDIFF_BENCH_DIR", "/tmp/skindiff-bench"))
    folder = root / f"{name}-{os.getpid()}-{time.time_ns()}"
    folder.mkdir(parents=True)
    return folder
