"""Skin tone of an image: the Individual Typology Angle (ITA) of its healthy skin.

ITA = arctan((L* - 50) / b*) x 180 / pi, from CIELAB (D65), is the dermatology standard for an
objective skin tone; the Del Bino categories cut it at 55, 41, 28, 10 and -30 degrees. It
agrees with labelled Fitzpatrick types only loosely on clinical photos (Groh et al., 2021), so
it checks the skin types a generator makes, it does not replace the labels.

Which pixels count, and why:
- the border ring (the outer `BORDER` of each side): clinical photos centre the lesion, so the
  border is mostly healthy skin;
- of those, the skin-coloured ones: L* between 10 and 97 (no clipped shadows or highlights),
  chroma >= 4 (no grey or white background) and a hue angle between 0 and 90 degrees (skin is
  red-yellow at every tone; blue cloth, green drapes are not);
- the ITA of the image is the median over those pixels' ITAs: lesion, hair or shadow pixels
  that pass the mask are a minority on the border and shift a median far less than a mean.
If fewer than `MIN_SKIN_FRACTION` of the ring's pixels pass, the image has no usable skin and
`measure_skin_tone` refuses it rather than report a tone of something else.
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image
from scipy.stats import spearmanr
from skimage.color import rgb2lab
from sklearn.metrics import roc_auc_score

from skindiff.errors import SkindiffError

BORDER = 0.25  # share of each side that forms the ring
MIN_SKIN_FRACTION = 0.2  # of the ring's pixels
ANALYSIS_SIDE = 128  # images are shrunk to this shorter side first: tone needs no detail

# Del Bino et al.: lower bounds of each category, lightest first.
ITA_CATEGORIES: tuple[tuple[str, float], ...] = (
    ("very light", 55.0),
    ("light", 41.0),
    ("intermediate", 28.0),
    ("tan", 10.0),
    ("brown", -30.0),
    ("dark", -np.inf),
)


@dataclass(frozen=True)
class SkinTone:
    ita: float  # degrees
    category: str  # Del Bino category of `ita`
    skin_fraction: float  # share of the image's pixels the measurement used


def ita_degrees(lightness: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ITA in degrees of CIELAB L* and b* (b* > 0 for skin; arctan2 keeps b* = 0 finite)."""
    return np.degrees(np.arctan2(lightness - 50.0, b))


def ita_category(ita: float) -> str:
    """The Del Bino category of an ITA in degrees."""
    return next(name for name, lower in ITA_CATEGORIES if ita > lower)


def skin_mask(lab: np.ndarray) -> np.ndarray:
    """Pixels of a CIELAB image (H x W x 3) coloured like skin (see the module doc)."""
    lightness, a, b = lab[..., 0], lab[..., 1], lab[..., 2]
    chroma = np.hypot(a, b)
    hue = np.degrees(np.arctan2(b, a))
    return (lightness > 10) & (lightness < 97) & (chroma >= 4) & (hue >= 0) & (hue <= 90)


def border_ring(height: int, width: int) -> np.ndarray:
    """True on the outer BORDER of each side."""
    ring = np.ones((height, width), bool)
    dy, dx = int(height * BORDER), int(width * BORDER)
    ring[dy : height - dy, dx : width - dx] = False
    return ring


def measure_skin_tone(image: Image.Image | np.ndarray) -> SkinTone:
    """The ITA of an RGB image's (PIL, uint8 H x W x 3, or floats in 0-1) healthy skin;
    raises SkindiffError when too little skin remains."""
    if isinstance(image, Image.Image):
        image = _shrunk(image)
    rgb = np.asarray(image)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise SkindiffError(f"expected an RGB image, got an array of shape {rgb.shape}")
    lab = rgb2lab(rgb)
    ring = border_ring(*rgb.shape[:2])
    used = ring & skin_mask(lab)
    share = used.sum() / ring.sum()
    if share < MIN_SKIN_FRACTION:
        raise SkindiffError(
            f"too little skin to measure its tone: {share:.0%} of the border pixels look like "
            f"skin, {MIN_SKIN_FRACTION:.0%} needed"
        )
    ita = float(np.median(ita_degrees(lab[..., 0][used], lab[..., 2][used])))
    return SkinTone(ita, ita_category(ita), float(used.sum() / used.size))


def measured_ita(image: Image.Image) -> float:
    """`measure_skin_tone(image).ita`, NaN when the image has too little skin."""
    try:
        return measure_skin_tone(image).ita
    except SkindiffError:
        return float("nan")


def _shrunk(image: Image.Image) -> np.ndarray:
    image = image.convert("RGB")
    scale = ANALYSIS_SIDE / min(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(image)


# --- agreement with the labelled skin types ---------------------------------------------------


def ita_by_skin_type(rows: pd.DataFrame) -> pd.DataFrame:
    """Per `fitzpatrick_scale`: images, those with a measurable `ita`, and its quartiles."""
    measured = rows.dropna(subset=["ita"])
    quartiles = measured.groupby("fitzpatrick_scale")["ita"].quantile([0.25, 0.5, 0.75])
    table = quartiles.unstack().rename(
        columns={0.25: "ita_q25", 0.5: "ita_median", 0.75: "ita_q75"}
    )
    counts = rows.groupby("fitzpatrick_scale").size().rename("images")
    measured_counts = measured.groupby("fitzpatrick_scale").size().rename("measured")
    table = pd.concat([counts, measured_counts, table], axis=1).fillna({"measured": 0})
    return table.astype({"measured": int}).reset_index()


@dataclass(frozen=True)
class ToneAgreement:
    """How well ITA agrees with labelled skin types, over the rows with a measurable ITA."""

    spearman: float  # of ITA against the Fitzpatrick type; negative: higher types are darker
    dark_auc: float  # of -ITA telling the dark group from the light one (0.5 = chance)
    measured: int


def ita_agreement(rows: pd.DataFrame) -> ToneAgreement:
    """Spearman's rho of ITA against `fitzpatrick_scale` and the AUC of ITA separating the
    `group`s light and dark (NaN where a group or the spread is missing)."""
    measured = rows.dropna(subset=["ita"])
    nan = float("nan")
    if measured["fitzpatrick_scale"].nunique() < 2:
        return ToneAgreement(nan, nan, len(measured))
    rho = float(spearmanr(measured["fitzpatrick_scale"], measured["ita"]).statistic)
    grouped = measured[measured["group"].isin(["light", "dark"])]
    auc = nan
    if grouped["group"].nunique() == 2:
        auc = float(roc_auc_score(grouped["group"] == "dark", -grouped["ita"]))
    return ToneAgreement(rho, auc, len(measured))
