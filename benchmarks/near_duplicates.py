"""Near-duplicate detection: what the thumbnails' threshold finds on the demo, and what looking
costs at Fitzpatrick17k's size.

1. Calibration: the demo's planted copies found, and the other images flagged, per similarity
   threshold (the demo's seed-0 cohort, scenario i, pHash distance 0).
2. Cost: pHash and thumbnails of 17,000 generated 600 x 450 JPEGs (Fitzpatrick17k's count and
   typical size), first call and cached second call; the pair search over all of them;
   ResNet-18 features (random weights: the same arithmetic as ImageNet's) of a sample, scaled
   to 17,000; and `prepare` of the real metadata with identical placeholder images (every
   pair a near-duplicate: 1,631 images, 1.3 million pairs) with near_duplicates off against
   report.

    python -m benchmarks.near_duplicates            # ~15 min on 2 cores, most of it writing images

Writes docs/generated/near_duplicates.md.
"""

import argparse
import io
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tabulate import tabulate
from torchvision import models

from benchmarks.common import record
from skindiff.core.files import sha256_file
from skindiff.data import image_signatures
from skindiff.data.config import DuplicateFeatures, NearDuplicates, PrepareConfig
from skindiff.data.demo import default_demo_dataset
from skindiff.data.near_duplicates import DuplicateRule, similar_pairs
from skindiff.data.prepare import prepare_scenario

REAL_METADATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "fitzpatrick17k.csv"
THRESHOLDS = (0.92, 0.93, 0.94, 0.942, 0.95, 0.96)
N_IMAGES, SIZE = 17_000, (600, 450)
RESNET_SAMPLE = 500


def calibration() -> str:
    demo = default_demo_dataset()
    planted = pd.read_csv(demo.planted_copies)
    found = prepare_scenario(PrepareConfig(near_duplicate_features="thumbnails")).near_duplicates
    rows = found.rows
    position = {md5: i for i, md5 in enumerate(rows["md5hash"])}
    truth = {
        frozenset((position[a], position[b]))
        for a, b in zip(planted.md5hash, planted.copy_of, strict=True)
        if a in position and b in position
    }
    in_truth = {i for pair in truth for i in pair}
    hashes, views = image_signatures.image_signatures(rows, DuplicateFeatures.THUMBNAILS)
    everything = similar_pairs(hashes, views, DuplicateRule(DuplicateFeatures.THUMBNAILS, -1, 0))
    lines = []
    for threshold in THRESHOLDS:
        near = everything[(everything.similarity >= threshold) | (everything.hash_distance <= 0)]
        pairs = {frozenset(p) for p in zip(near.a, near.b, strict=True)}
        flagged = {i for pair in pairs - truth for i in pair} - in_truth
        lines.append(
            {
                "similarity threshold": f"{threshold:g}",
                "planted pairs found": f"{len(pairs & truth)} of {len(truth)}",
                "other images flagged": f"{len(flagged)} of {len(rows) - len(in_truth)}",
                "other images flagged %": f"{100 * len(flagged) / (len(rows) - len(in_truth)):.2f}",
            }
        )
    return (
        "### Calibration on the demo (seed 0's cohort, thumbnails, pHash distance 0)\n\n"
        + tabulate(lines, headers="keys", tablefmt="github", floatfmt=".2f", disable_numparse=True)
    )


def placeholder_images(folder: Path, n_images: int) -> pd.DataFrame:
    """`n_images` distinct 600 x 450 JPEGs: smooth random colour fields, written once."""
    folder.mkdir(parents=True, exist_ok=True)

    def write(k: int) -> str:
        path = folder / f"{k:05d}.jpg"
        if not path.is_file():
            rng = np.random.default_rng(k)
            small = Image.fromarray(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8))
            buffer = io.BytesIO()
            small.resize(SIZE, Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
            path.write_bytes(buffer.getvalue())
        return str(path)

    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        paths = list(pool.map(write, range(n_images)))
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        digests = list(pool.map(sha256_file, paths))
    return pd.DataFrame({"path": paths, "sha256": digests})


def timed(work) -> tuple[float, object]:
    start = time.perf_counter()
    result = work()
    return time.perf_counter() - start, result


def cost(folder: Path, n_images: int) -> str:
    rows = placeholder_images(folder / "images", n_images)
    os.environ["SKINDIFF_CACHE"] = str(folder / f"cache-{time.time_ns()}")
    first, (hashes, views) = timed(
        lambda: image_signatures.image_signatures(rows, DuplicateFeatures.THUMBNAILS)
    )
    second, _ = timed(lambda: image_signatures.image_signatures(rows, DuplicateFeatures.THUMBNAILS))
    rule = DuplicateRule.of(PrepareConfig(near_duplicate_features="thumbnails"))
    search, pairs = timed(lambda: similar_pairs(hashes, views, rule))
    backbone = models.resnet18()
    backbone.fc = torch.nn.Identity()
    backbone.eval()
    sample = rows["path"].tolist()[:RESNET_SAMPLE]
    resnet, _ = timed(lambda: image_signatures.backbone_features(sample, backbone))
    lines = [
        ("pHash + thumbnails, first call", first),
        ("pHash + thumbnails, second call (cached)", second),
        (f"pair search, thumbnails ({len(pairs)} pairs found)", search),
        (
            f"ResNet-18 features (from {RESNET_SAMPLE} images, scaled)",
            resnet * n_images / min(RESNET_SAMPLE, n_images),
        ),
    ]
    table = tabulate(
        [(what, f"{seconds:.1f}", f"{seconds / 60:.1f}") for what, seconds in lines],
        headers=(f"{n_images} images of 600 x 450 px", "seconds", "minutes"),
        tablefmt="github",
    )
    ratio = f"cached / first call: {second / first:.3f}"
    return f"### Cost at Fitzpatrick17k's size\n\n{table}\n\n{ratio}"


def identical_placeholders(folder: Path) -> str:
    if not REAL_METADATA.is_file():
        return f"(the real metadata is not at {REAL_METADATA}: prepare not measured)"
    from skindiff.data.cohort import CohortSpec, select_cohort
    from skindiff.data.metadata import read_metadata

    images = folder / "identical"
    images.mkdir(exist_ok=True)
    placeholder = Image.new("RGB", SIZE, (190, 140, 120))
    for path in select_cohort(read_metadata(REAL_METADATA), CohortSpec())["path"]:
        placeholder.save(images / path)
    config = PrepareConfig(metadata_csv=str(REAL_METADATA), image_dir=str(images))
    off, _ = timed(lambda: prepare_scenario(replace(config, near_duplicates=NearDuplicates.OFF)))
    report, prepared = timed(lambda: prepare_scenario(config))
    metrics = prepared.near_duplicates.metrics()
    return (
        "### The real metadata with identical placeholder images\n\n"
        f"prepare, near_duplicates off: {off:.1f} s; report: {report:.1f} s "
        f"(report / off: {report / off:.1f}x), {metrics['n_near_duplicate_pairs']} pairs "
        f"counted, largest cluster {metrics['near_duplicate_largest_cluster']} images."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench = Path(os.environ.get("SKINDIFF_BENCH_DIR", "/tmp/skindiff-bench"))
    parser.add_argument("--folder", type=Path, default=bench / "near-duplicates")
    parser.add_argument("--images", type=int, default=N_IMAGES, help="placeholder images timed")
    args = parser.parse_args()
    sections = [
        calibration(),
        cost(args.folder, args.images),
        identical_placeholders(args.folder),
    ]
    record("near_duplicates", "\n\n".join(sections), "cpu", markdown=True)


if __name__ == "__main__":
    main()
