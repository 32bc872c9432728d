"""The OpenMP thread policy skindiff sets, on shared cores: the same generation in a process
that loads torch before skindiff (torch's default: threads spin while they wait) and in one
that loads skindiff first (passive threads), on a quiet machine and beside one busy process.

Each way runs in a child process, since the OpenMP runtime reads its policy once, at start.

    python -m benchmarks.thread_policy
"""

import argparse
import json
import os
import subprocess
import sys
import time

from tabulate import tabulate

from benchmarks.common import bench_folder

SPIN = "while True: pass"
# A child: loads torch first (spinning) or skindiff first (passive), then times `generate`.
CHILD = """
import json, sys, time
if sys.argv[1] == "spinning":
    import torch
from benchmarks.common import demo_training_rows
from skindiff.diffusion.config import GenerateConfig
from skindiff.diffusion.generate import generate_synthetic
rows = demo_training_rows(1)
config = GenerateConfig(mode="img2img/vanilla", num_inference_steps=int(sys.argv[3]))
start = time.perf_counter()
made = generate_synthetic(config, rows, sys.argv[2], progress=False)
print(json.dumps({"seconds": time.perf_counter() - start, "images": len(made)}))
"""


def timed_child(policy: str, busy: bool, folder: str, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    neighbour = subprocess.Popen([sys.executable, "-c", SPIN]) if busy else None
    try:
        time.sleep(0.5 if busy else 0)  # the neighbour is running before the work starts
        done = subprocess.run(
            [sys.executable, "-c", CHILD, policy, folder, str(steps)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        if neighbour is not None:
            neighbour.kill()
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="scheduler steps (x strength 0.5)")
    args = parser.parse_args()
    folder = bench_folder("thread-policy")
    results = {}
    for busy in (False, True):
        for policy in ("spinning", "passive"):
            out = str(folder / f"{policy}-{'busy' if busy else 'quiet'}")
            results[policy, busy] = timed_child(policy, busy, out, args.steps)
    rows = [
        [
            policy,
            "busy neighbour" if busy else "quiet",
            f"{r['seconds']:.1f}",
            f"{r['images'] / r['seconds']:.2f}",
        ]
        for (policy, busy), r in results.items()
    ]
    print(f"\nimg2img on the CPU ({os.cpu_count()} cores), tiny, {args.steps} steps")
    print(tabulate(rows, headers=["threads", "machine", "wall s", "images/s"]))
    quiet = results["passive", False]["seconds"] / results["spinning", False]["seconds"]
    busy = results["spinning", True]["seconds"] / results["passive", True]["seconds"]
    print(f"quiet: passive takes {quiet:.2f}x the spinning time")
    print(f"thread policy: skindiff {busy:.2f}x the baseline's images/s beside a busy process")


if __name__ == "__main__":
    main()
