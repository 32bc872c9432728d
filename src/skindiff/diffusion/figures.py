"""Image grids for looking at what a generator makes."""

from pathlib import Path

import pandas as pd
from diffusers.utils import make_image_grid
from PIL import Image

from skindiff.data.images import load_rgb


def real_synthetic_pairs(manifest: pd.DataFrame, out_dir: Path, cell: int = 128) -> Image.Image:
    """Like the paper's Fig. 2: per condition, one source image (light-skinned where the
    condition has one) followed by its variants."""
    rows = []
    for _, variants in manifest.groupby("label", sort=True):
        light = variants[variants["source_group"] == "light"]
        if len(light):
            variants = light
        first = variants[variants["md5hash"] == variants["md5hash"].iloc[0]]
        source = load_rgb(Path(first["source_path"].iloc[0]))
        rows.append([source, *(load_rgb(Path(out_dir) / p) for p in first["path"])])
    images = [image.resize((cell, cell), Image.Resampling.BICUBIC) for row in rows for image in row]
    return make_image_grid(images, rows=len(rows), cols=len(rows[0]))
