"""Quality against cost: scenario i's synthetic set from the reference sampler (the model's own
scheduler, 100 steps x strength 0.5: about 50 UNet calls per image) and from DPM-Solver++ and
DDIM at 50, 25 and 10 steps x 0.5, with the demo's generator and classifier settings, per seed.

Per setting: UNet calls per image, images/s (the generate runs' wall time), the Fréchet distance
and KID against the reference set (the synthetic_quality runs), the Fréchet distance against the
reference sampler's own images of the same seed, and the dark-test macro-F1 of a classifier
trained on that setting's images only, with the report's paired interval against the reference
sampler's. Names the cheapest setting not distinguishable from the reference on that score.
Writes docs/generated/sampler_quality.md.

    python -m benchmarks.sampler_quality                       # 5 seeds: hours on 2 CPU cores
    python -m benchmarks.sampler_quality --seeds 0 --settings dpm++:10   # a smoke run

Every run is found or made in --folder's tracking store (default
$SKINDIFF_BENCH_DIR/sampler-quality), so a stopped call resumes.
"""

import argparse
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from tabulate import tabulate

from benchmarks.common import record
from skindiff import paired
from skindiff.classify.config import TrainType
from skindiff.data.config import Scenario
from skindiff.diffusion.config import SchedulerName
from skindiff.options import DEMO_STUDY
from skindiff.quality.measures import frechet_distance
from skindiff.tracking.experiment import use_experiment
from skindiff.tracking.generate import ensure_generator_chain, load_synthetic
from skindiff.tracking.names import TEST_PREDICTIONS
from skindiff.tracking.prepare import ensure_prepare
from skindiff.tracking.synthetic_quality import (
    chosen_features,
    feature_network,
    run_synthetic_quality,
)
from skindiff.tracking.train_classifier import run_train_classifier

SEEDS = (0, 42, 123, 1111, 1234)
REFERENCE = ("default", 100)
SETTINGS = [REFERENCE] + [(s, n) for s in ("dpm++", "ddim") for n in (50, 25, 10)]


def seed_runs(seed: int, scheduler: str, steps: int) -> dict[str, str]:
    """The runs of one seed and setting, found or made: prepare, generate, the syn-only
    classifier, synthetic_quality."""
    configs = DEMO_STUDY.build({}).for_pair(Scenario.I, seed)
    generate = replace(
        configs.generate, scheduler=SchedulerName(scheduler), num_inference_steps=steps
    )
    data, ti, lora = configs.data, configs.textual_inversion, configs.lora
    prepare = ensure_prepare(data)
    generate_run = ensure_generator_chain(data, ti, lora, generate, prepare)[2]
    syn = replace(configs.classifier, train_type=TrainType.SYN)
    classifier = run_train_classifier(
        data, syn, ti, lora, generate, prepare, generate_run, reuse=True
    )
    quality = run_synthetic_quality(
        data,
        ti,
        lora,
        generate,
        configs.classifier,
        configs.quality,
        prepare,
        generate_run,
        reuse=True,
    )
    return {
        "prepare": prepare,
        "generate": generate_run,
        "classifier": classifier,
        "quality": quality,
    }


def synthetic_features(seed: int, generate_run: str, prepare: str) -> np.ndarray:
    """A generate run's images in the synthetic_quality runs' features (from their cache)."""
    configs = DEMO_STUDY.build({}).for_pair(Scenario.I, seed)
    network = feature_network(
        chosen_features(configs.quality),
        configs.data,
        configs.textual_inversion,
        configs.lora,
        configs.generate,
        configs.classifier,
        prepare,
    )
    with tempfile.TemporaryDirectory() as tmp:
        return network.features(load_synthetic(generate_run, Path(tmp)))


def predictions(classifier_run: str) -> pd.DataFrame:
    path = mlflow.artifacts.download_artifacts(f"runs:/{classifier_run}/{TEST_PREDICTIONS}")
    return pd.read_csv(path, keep_default_na=False).set_index("md5hash")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument(
        "--settings",
        default=",".join(f"{s}:{n}" for s, n in SETTINGS[1:]),
        help="scheduler:steps list besides the reference (default:100), which always runs",
    )
    bench = Path(os.environ.get("SKINDIFF_BENCH_DIR", "/tmp/skindiff-bench"))
    parser.add_argument("--folder", type=Path, default=bench / "sampler-quality")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = [REFERENCE] + [
        (s, int(n)) for s, n in (item.split(":") for item in args.settings.split(","))
    ]
    args.folder.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(f"sqlite:///{args.folder.resolve() / 'mlflow.db'}")
    os.environ.setdefault("SKINDIFF_CACHE", str(args.folder.resolve() / "cache"))
    use_experiment("sampler-quality")

    runs = {(seed, setting): seed_runs(seed, *setting) for setting in settings for seed in seeds}
    demo = DEMO_STUDY.build({})
    strength, labels = demo.generate.strength, demo.data.cohort.labels
    rows = []
    for setting in settings:
        scheduler, steps = setting
        generated = [mlflow.get_run(runs[(s, setting)]["generate"]) for s in seeds]
        images = sum(r.data.metrics["n_synthetic"] for r in generated)
        seconds = sum((r.info.end_time - r.info.start_time) / 1e3 for r in generated)
        quality = [mlflow.get_run(runs[(s, setting)]["quality"]) for s in seeds]
        features = quality[0].data.params["quality_features"]
        measured = {
            name: np.mean([q.data.metrics[f"{name}_{features}"] for q in quality])
            for name in ("fd", "kid")
        }
        own = []
        for seed in seeds:
            prepare = runs[(seed, setting)]["prepare"]
            reference = synthetic_features(seed, runs[(seed, REFERENCE)]["generate"], prepare)
            ours = synthetic_features(seed, runs[(seed, setting)]["generate"], prepare)
            # identical features give a tiny negative number from the matrix square root
            own.append(max(0.0, frechet_distance(reference, ours)))
        seed_pairs = []
        for seed in seeds:
            baseline = predictions(runs[(seed, REFERENCE)]["classifier"])
            candidate = predictions(runs[(seed, setting)]["classifier"]).loc[baseline.index]
            seed_pairs.append(
                paired.SeedPredictions.from_labels(
                    baseline["label"].tolist(),
                    baseline["predicted"].tolist(),
                    candidate["predicted"].tolist(),
                    labels,
                )
            )
        difference = paired.paired_difference(seed_pairs, "f1_macro")
        f1 = np.mean(
            [
                mlflow.get_run(runs[(s, setting)]["classifier"]).data.metrics["test_f1_macro"]
                for s in seeds
            ]
        )
        rows.append(
            {
                "setting": f"{scheduler} x {steps}",
                "UNet calls / image": int(steps * strength),
                "images/s": images / seconds,
                f"FD ({features})": measured["fd"],
                f"KID ({features})": measured["kid"],
                "FD to reference sampler": np.mean(own),
                "syn-only macro-F1 %": 100 * f1,
                "vs reference [95% interval]": (
                    f"{difference.mean_diff:+.2f} [{difference.ci_low:+.2f}, "
                    f"{difference.ci_high:+.2f}]"
                ),
                "verdict": difference.verdict,
            }
        )
    table = pd.DataFrame(rows)
    same = table[(table["verdict"] == paired.NOT_DISTINGUISHABLE) | (table.index == 0)]
    cheapest = same.sort_values("UNet calls / image").iloc[0]
    text = "\n\n".join(
        [
            f"Scenario i of the demo, seeds {', '.join(map(str, seeds))}; strength {strength}; "
            "the demo's generator and classifier settings otherwise. images/s: the generate "
            "runs' wall time (model loading included).",
            tabulate(table, headers="keys", tablefmt="github", showindex=False, floatfmt=".3f"),
            f"cheapest setting whose syn-only macro-F1 is not distinguishable from the reference "
            f"sampler's: {cheapest['setting']} ({cheapest['UNet calls / image']} UNet calls per "
            f"image against {table['UNet calls / image'].iloc[0]})",
        ]
    )
    record("sampler_quality", text, "cpu", markdown=True)


if __name__ == "__main__":
    main()
