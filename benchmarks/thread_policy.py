"""The OpenMP thread policy, on quiet and shared cores: torch's default (threads spin 300,000
turns before they sleep), threads that sleep at once, and skindiff's choice (a short spin when
the cores are free as it starts, else sleeping at once), each timing a tiny LoRA step and
img2img generation, on a quiet machine and beside one busy process.

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

from benchmarks.common import bench_folder, record

SPIN = "while True: pass"
# A child: times LoRA steps (the difference of a 60- and a 10-step run, so loading and encoding
# cancel out) and `generate`, and says which policy it ran with.
CHILD = """
import json, os, sys, time
from dataclasses import replace
from pathlib import Path
from benchmarks.common import demo_training_rows
from skindiff.diffusion.config import GenerateConfig, LoraConfig
from skindiff.diffusion.generate import generate_synthetic
from skindiff.diffusion.lora import train_lora
folder = Path(sys.argv[1])
rows = demo_training_rows()

def lora_seconds(steps):
    config = replace(LoraConfig(), max_train_steps=steps, checkpoint_every=steps)
    start = time.perf_counter()
    train_lora(config, rows, None, folder / f"lora-{steps}", progress=False)
    return time.perf_counter() - start

lora_ms = (lora_seconds(60) - lora_seconds(10)) / 50 * 1000
config = GenerateConfig(mode="img2img/vanilla", num_inference_steps=int(sys.argv[2]))
start = time.perf_counter()
made = generate_synthetic(config, demo_training_rows(1), folder / "generate", progress=False)
policy = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ}
print(json.dumps({"lora_ms": lora_ms, "images_per_s": len(made) / (time.perf_counter() - start),
                  "policy": policy}))
"""
WAYS = {
    "torch default": {"GOMP_SPINCOUNT": "300000"},
    "sleep at once": {"OMP_WAIT_POLICY": "PASSIVE"},
    "skindiff": {},
}


def timed_child(way: str, busy: bool, folder: str, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    neighbour = subprocess.Popen([sys.executable, "-c", SPIN]) if busy else None
    try:
        time.sleep(0.5 if busy else 0)  # the neighbour is running before the work starts
        done = subprocess.run(
            [sys.executable, "-c", CHILD, folder, str(steps)],
            env=env | WAYS[way],
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
        for way in WAYS:
            out = str(folder / f"{way.replace(' ', '-')}-{'busy' if busy else 'quiet'}")
            results[way, busy] = timed_child(way, busy, out, args.steps)
    rows = [
        [
            way,
            "busy neighbour" if busy else "quiet",
            " ".join(f"{k}={v}" for k, v in r["policy"].items()),
            f"{r['lora_ms']:.0f}",
            f"{r['images_per_s']:.2f}",
        ]
        for (way, busy), r in results.items()
    ]
    lines = [
        f"OpenMP thread policy on the CPU ({os.cpu_count()} cores), tiny",
        tabulate(
            rows,
            headers=["threads", "machine", "policy", "LoRA ms/step", "img2img images/s"],
        ),
    ]
    for busy in (False, True):
        ours = results["skindiff", busy]
        for way in ("torch default", "sleep at once"):
            theirs = results[way, busy]
            lines.append(
                f"{'busy' if busy else 'quiet'}: skindiff against {way}: LoRA steps "
                f"{theirs['lora_ms'] / ours['lora_ms']:.2f}x, img2img "
                f"{ours['images_per_s'] / theirs['images_per_s']:.2f}x"
            )
    worst = min(
        min(results[w, b]["lora_ms"] for w in WAYS) / results["skindiff", b]["lora_ms"]
        for b in (False, True)
    )
    lines.append(f"thread policy: skindiff {worst:.2f}x the best way's LoRA steps/s, quiet or busy")
    record("thread_policy", "\n".join(lines), "cpu")


if __name__ == "__main__":
    main()
