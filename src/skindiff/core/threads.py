"""How torch's OpenMP threads wait between parallel regions, chosen before torch loads.

Threads that spin while they wait lose most of their time when another process shares the
cores; threads that sleep at once pay a wake-up on each of the thousands of small operations of
a training step. Measured on 2 cores (`benchmarks/thread_policy.py`: a tiny LoRA step, img2img
images/s), quiet: sleeping at once 107 ms and 8.5/s, spinning 1,000 turns first 50 ms and 10.7/s;
beside one busy process: 67-79 ms and 6.8/s against 127 ms and 5.7/s (torch's default, 300,000
turns: 200 ms and 2.9/s). So the threads spin briefly when the other processes leave this
process's cores free as skindiff starts, and sleep at once when they do not.

The number of threads stays the number of cores either way: on a CPU it changes the sums, and a
run must make the same bytes whatever else the machine is doing.

This module imports nothing heavy: a command calls `choose_thread_policy` as it starts, before
torch loads.
"""

import os
import time
from collections.abc import MutableMapping
from pathlib import Path

PROC_STAT = Path("/proc/stat")
SAMPLE_SECONDS = 0.1
SHORT_SPIN = "1000"  # turns of a waiting thread: enough to bridge a step's gaps (measured)
# Other processes' use of this process's cores, in cores, above which threads sleep at once.
BUSY_CORES = 0.5
# Fields of a /proc/stat cpu line counted as busy: user, nice, system, irq, softirq, steal
# (guest time is already in user and nice; idle and iowait are free).
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)
_ALL_FIELDS = 8


def cpu_jiffies(proc_stat: str, cpus: set[int]) -> tuple[int, int]:
    """(busy, total) jiffies since boot of `cpus`, from the text of /proc/stat."""
    busy = total = 0
    for line in proc_stat.splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            counts = [int(v) for v in values[:_ALL_FIELDS]]
            busy += sum(counts[i] for i in _BUSY_FIELDS)
            total += sum(counts)
    return busy, total


def busy_cores_of_others(seconds: float = SAMPLE_SECONDS) -> float | None:
    """How many of this process's cores other processes kept busy over the next `seconds` (this
    process sleeps meanwhile); None where the system does not say (no /proc/stat)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cpus = os.sched_getaffinity(0)
    try:
        before = cpu_jiffies(PROC_STAT.read_text(), cpus)
        time.sleep(seconds)
        after = cpu_jiffies(PROC_STAT.read_text(), cpus)
    except OSError:
        return None
    if after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1]) * len(cpus)


def thread_policy_for(busy_cores: float | None) -> dict[str, str]:
    """The OpenMP settings for cores that others keep `busy_cores` busy (None: unknown)."""
    if busy_cores is not None and busy_cores < BUSY_CORES:
        return {"GOMP_SPINCOUNT": SHORT_SPIN}
    return {"OMP_WAIT_POLICY": "PASSIVE"}


def choose_thread_policy(environ: MutableMapping[str, str] = os.environ) -> None:
    """Sets the OpenMP wait policy in `environ` from how busy the cores are now, unless it says
    how threads wait already (OMP_WAIT_POLICY or GOMP_SPINCOUNT: the user's choice, or a parent
    skindiff process's). The OpenMP runtime reads it once, when torch loads it."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return
    environ.update(thread_policy_for(busy_cores_of_others()))
