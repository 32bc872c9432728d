"""Figures for looking at what a generator makes: image grids, skin-tone histograms."""

from pathlib import Path

import numpy as np
import pandas as pd
from diffusers.utils import make_image_grid
from matplotlib.figure import Figure
from PIL import Image

from skindiff.data.images import load_rgb
from skindiff.data.skin_tone import ITA_CATEGORIES


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


def skin_tone_histograms(sources: pd.DataFrame, manifest: pd.DataFrame) -> Figure:
    """ITA histograms of the real light and dark training images and of the synthetic ones,
    over the Del Bino category bands (`sources` and `manifest` with an `ita` column)."""
    figure = Figure(figsize=(8, 4), layout="constrained")
    axes = figure.subplots()
    series = {
        "real, light group": sources.loc[sources["group"] == "light", "ita"],
        "real, dark group": sources.loc[sources["group"] == "dark", "ita"],
        "synthetic": manifest["ita"],
    }
    values = pd.concat(series.values()).dropna()
    low, high = min(-60.0, values.min()), max(80.0, values.max())
    bins = np.linspace(low, high, 40)
    upper = high
    for k, (name, lower) in enumerate(ITA_CATEGORIES):
        axes.axvspan(max(lower, low), upper, color="0.9" if k % 2 else "0.8", zorder=0)
        axes.text(
            (max(lower, low) + upper) / 2,
            1.0,
            name,
            ha="center",
            va="bottom",
            fontsize=7,
            transform=axes.get_xaxis_transform(),
        )
        upper = lower
    for (name, itas), colour in zip(
        series.items(), ("tab:orange", "tab:brown", "tab:blue"), strict=True
    ):
        itas = itas.dropna()
        label = f"{name} (n={len(itas)})"
        if itas.empty:  # e.g. no dark training images (scenario iii): named, not drawn
            axes.plot([], [], color=colour, linewidth=2, label=label)
            continue
        axes.hist(
            itas, bins=bins, density=True, histtype="step", linewidth=2, color=colour, label=label
        )
    axes.set_xlim(low, high)
    axes.set_xlabel("ITA (degrees): lighter to the right")
    axes.set_ylabel("density")
    axes.legend(loc="upper center", fontsize=8)  # over tan and intermediate, where few are
    return figure
