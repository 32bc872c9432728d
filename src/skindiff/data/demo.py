"""A small, procedurally drawn dataset in Fitzpatrick17k format, so everything runs offline.

The images are cartoons of clinical photos: skin whose tone follows the Fitzpatrick skin type
(FST) and a lesion pattern that differs per condition. They are good enough for a small CNN to
learn both, which is all the pipeline's smoke tests and examples need.

Like Fitzpatrick17k, the demo holds planted near-duplicates: a few images appear a second time
under another md5hash, re-encoded, resized and slightly cropped (some with a watermark, one
with another skin type, one with another condition), listed in `planted_copies.csv`.
"""

import csv
import hashlib
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from tqdm import tqdm

from skindiff.core.files import atomic_directory, cache_dir, cached_directory
from skindiff.data.fitzpatrick import (
    CONDITIONS,
    DARK_FST,
    FITZPATRICK17K_COLUMNS,
    LIGHT_FST,
    PARTITIONS,
    UNKNOWN_FST,
    VALID_FST,
)
from skindiff.errors import SkindiffError

DEMO_VERSION = 2  # bump when drawing changes, so cached copies are rebuilt

JPEG_QUALITY = 90
DISTRACTOR_FST = (3, 4, UNKNOWN_FST)
# A condition outside the paper's seven, so that label filtering gets exercised.
EXTRA_CONDITION = "eczema"
EXTRA_PARTITIONS = ("inflammatory", "non-neoplastic")
# Distractors get their own generator streams, so they never repeat a cohort image even when the
# spec's cohort contains the same FST.
_DISTRACTOR_STREAM = 100
_COPY_STREAM = 200
PLANTED_COPIES_FILE = "planted_copies.csv"
# copies that disagree with their original, as atlases' copies sometimes do: (condition
# index, FST) of the original -> the copy's FST, or the copy's condition index
_FST_CONFLICT = {(0, 5): 6}
_LABEL_CONFLICT = {(1, 6): 2}

SKIN_TONES = {
    1: (241, 214, 196),
    2: (224, 184, 152),
    3: (198, 150, 112),
    4: (165, 112, 76),
    5: (112, 72, 50),
    6: (70, 45, 35),
    UNKNOWN_FST: (185, 135, 98),
}


@dataclass(frozen=True)
class DemoSpec:
    """How many demo images to draw, and how large."""

    # images per condition for each Fitzpatrick skin type of the cohort
    per_condition: tuple[tuple[int, int], ...] = ((1, 8), (2, 12), (5, 8), (6, 6))
    image_size: int = 128
    # rows outside the cohort, so selection rules get exercised: FST 3, 4 and -1 of the seven
    # conditions, and one extra condition ("eczema") at light and dark FST
    distractors_per_condition: int = 1
    # per condition, the FSTs (of those drawn) whose first image appears twice, transformed
    copied_fst: tuple[int, ...] = (2, 5, 6)

    def __post_init__(self) -> None:
        for fst, count in self.per_condition:
            if fst not in VALID_FST or count < 0:
                raise ValueError(f"invalid (FST, count) in per_condition: {(fst, count)}")
        fsts = [fst for fst, _ in self.per_condition]
        if len(set(fsts)) != len(fsts):
            # Each FST's images come from one generator stream; listing it twice repeats them.
            raise ValueError(f"an FST appears twice in per_condition: {self.per_condition}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32, got {self.image_size}")
        if self.distractors_per_condition < 0:
            raise ValueError("distractors_per_condition must not be negative")


@dataclass(frozen=True)
class DemoDataset:
    """Where a demo dataset lies: a Fitzpatrick17k-style CSV and its folder of JPEGs."""

    metadata_csv: Path
    image_dir: Path

    @property
    def planted_copies(self) -> Path:
        """CSV of the planted near-duplicates: md5hash (the copy), copy_of (the original)."""
        return self.metadata_csv.parent / PLANTED_COPIES_FILE


# ---------------------------------------------------------------------------------------------
# Drawing


_Coords = float | np.ndarray  # one value or one per shape


@dataclass
class Canvas:
    pixels: np.ndarray  # float32 (size, size, 3), 0..255
    skin: np.ndarray  # base skin colour; lesion colours are mixed relative to it
    rng: np.random.Generator

    @property
    def size(self) -> int:
        return self.pixels.shape[0]

    @property
    def unit(self) -> float:
        # Lengths in the painters are in pixels of a 128 px image.
        return self.size / 128

    def tint(self, light: tuple, dark: tuple, amount: float) -> np.ndarray:
        """Go ``amount`` of the way from the skin to a lesion colour suited to this skin tone.

        Lesions look different on dark skin (red reads as violaceous or dark brown), so the
        target colour slides from ``light`` to ``dark`` with the skin's darkness.
        """
        luminance = float(self.skin @ np.array([0.299, 0.587, 0.114]))
        darkness = np.clip((220 - luminance) / 170, 0, 1)
        target = np.array(light) * (1 - darkness) + np.array(dark) * darkness
        return self.skin + (target - self.skin) * amount

    def point(self, margin: float) -> tuple[float, float]:
        """A random point at least ``margin`` (a fraction of the size) from the edges."""
        x, y = self.rng.uniform(margin, 1 - margin, 2) * self.size
        return float(x), float(y)

    def noise(self, cells: int) -> np.ndarray:
        """Smooth 0..1 noise with about ``cells`` blobs across the image."""
        coarse = self.rng.random((cells, cells)).astype(np.float32)
        field = Image.fromarray(coarse, "F").resize((self.size, self.size), Image.BICUBIC)
        return np.clip(np.asarray(field), 0, 1)

    # The shape methods return alpha masks (0..1), softened by ``blur`` (in 128 px pixels).

    def polygon(self, points: list, blur: float = 0) -> np.ndarray:
        mask, draw = self._new_mask()
        draw.polygon(points, fill=255)
        return self._alpha(mask, blur)

    def circles(
        self, xs: _Coords, ys: _Coords, rs: _Coords, blur: float = 0, width: float = 0
    ) -> np.ndarray:
        """Filled discs, or rings of ``width`` when it is not 0."""
        mask, draw = self._new_mask()
        for x, y, r in zip(np.atleast_1d(xs), np.atleast_1d(ys), np.atleast_1d(rs), strict=True):
            box = [x - r, y - r, x + r, y + r]
            if width:
                draw.ellipse(box, outline=255, width=max(1, round(width)))
            else:
                draw.ellipse(box, fill=255)
        return self._alpha(mask, blur)

    def line(self, points: list, width: float, blur: float = 0) -> np.ndarray:
        mask, draw = self._new_mask()
        draw.line(points, fill=255, width=max(1, round(width)), joint="curve")
        return self._alpha(mask, blur)

    def paint(self, alpha: np.ndarray, colour: np.ndarray | tuple, opacity: float = 1) -> None:
        a = (alpha * opacity)[..., None]
        self.pixels += (np.asarray(colour, dtype=np.float32) - self.pixels) * a

    def _new_mask(self) -> tuple[Image.Image, ImageDraw.ImageDraw]:
        mask = Image.new("L", (self.size, self.size))
        return mask, ImageDraw.Draw(mask)

    def _alpha(self, mask: Image.Image, blur: float) -> np.ndarray:
        if blur:
            mask = mask.filter(ImageFilter.GaussianBlur(blur * self.unit))
        return np.asarray(mask, dtype=np.float32) / 255


def blob_outline(x: float, y: float, r: float, rng: np.random.Generator, wobble: float) -> list:
    """Vertices of an irregular closed outline: a circle with a few random low harmonics."""
    theta = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    radius = np.ones_like(theta)
    for harmonic in range(2, 6):
        radius += wobble / harmonic * rng.normal() * np.cos(harmonic * theta + rng.uniform(0, 6.3))
    radius = r * np.clip(radius, 0.4, None)
    return list(zip(x + radius * np.cos(theta), y + radius * np.sin(theta), strict=True))


def skin_background(skin: np.ndarray, rng: np.random.Generator, size: int) -> Canvas:
    canvas = Canvas(np.empty((size, size, 3), np.float32), skin, rng)
    # Uneven lighting and the curvature of the photographed body part.
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    light = 1 + 0.16 * (np.cos(angle) * xx + np.sin(angle) * yy) + 0.08 * (canvas.noise(4) - 0.5)
    canvas.pixels[:] = skin * light[..., None]
    # Pores: tiny darker dots, so the skin has texture rather than being flat.
    pores = rng.integers(0, size, (2, size * size // 50))
    canvas.pixels[pores[0], pores[1]] *= rng.uniform(0.82, 0.93, (pores.shape[1], 1))
    canvas.pixels += rng.normal(0, 2.5, (size, size, 1)) + rng.normal(0, 1.2, (size, size, 3))
    return canvas


def _basal_cell_carcinoma(c: Canvas) -> None:
    rng, u = c.rng, c.unit
    x, y = c.point(0.35)
    r = rng.uniform(16, 28) * u
    nodule = c.polygon(blob_outline(x, y, r, rng, 0.08), blur=1.5)
    c.paint(nodule, c.tint((230, 172, 170), (125, 95, 100), 0.85))
    # The rolled, pearly border is the tell-tale sign.
    ring = c.circles(x, y, 0.85 * r, blur=1.5, width=0.3 * r)
    c.paint(ring, c.tint((253, 236, 232), (165, 140, 145), 0.9), 0.8)
    c.paint(c.circles(x, y, 0.45 * r, blur=2), c.tint((196, 120, 112), (55, 35, 35), 0.8))
    for _ in range(rng.integers(3, 7)):
        angle = np.cumsum(rng.normal(0, 0.35, 5)) + rng.uniform(0, 2 * np.pi)
        dist = np.linspace(0.85, 0.2, 5) * r
        vessel = list(zip(x + dist * np.cos(angle), y + dist * np.sin(angle), strict=True))
        c.paint(c.line(vessel, u, blur=0.3), c.tint((205, 40, 50), (120, 30, 45), 0.95))
    c.paint(c.circles(x - 0.45 * r, y - 0.45 * r, 0.2 * r, blur=1.5), (255, 255, 255), 0.5)


def _folliculitis(c: Canvas) -> None:
    rng, u = c.rng, c.unit
    count = rng.integers(25, 60)
    xs, ys = rng.uniform(4 * u, c.size - 4 * u, (2, count))
    rs = rng.uniform(1.8, 3.5, count) * u
    c.paint(c.circles(xs, ys, 1.9 * rs, blur=1.5), c.tint((220, 90, 90), (105, 45, 50), 0.7))
    c.paint(c.circles(xs, ys, rs, blur=0.6), c.tint((205, 55, 60), (95, 35, 40), 0.95))
    pustules = c.circles(xs, ys, 0.5 * rs, blur=0.4)
    c.paint(pustules, c.tint((248, 238, 200), (215, 195, 160), 1.0), 0.9)


def _nematode_infection(c: Canvas) -> None:
    rng, u = c.rng, c.unit
    for _ in range(rng.integers(1, 3)):
        x, y = c.point(0.2)
        heading = rng.uniform(0, 2 * np.pi)
        wavelength, amplitude = rng.uniform(14, 26) * u, rng.uniform(0.7, 1.2)
        track = [(x, y)]
        for step in range(int(rng.uniform(0.9, 1.4) * c.size / (2 * u))):
            # Larvae wander: a sinuous path whose general direction slowly drifts.
            heading += rng.normal(0, 0.06)
            turn = amplitude * np.sin(2 * np.pi * step * 2 * u / wavelength)
            x, y = x + 2 * u * np.cos(heading + turn), y + 2 * u * np.sin(heading + turn)
            if not (0 <= x < c.size and 0 <= y < c.size):
                break
            track.append((x, y))
        c.paint(c.line(track, 6 * u, blur=2.5), c.tint((220, 110, 100), (110, 55, 58), 0.6))
        c.paint(c.line(track, 2.5 * u, blur=0.6), c.tint((180, 70, 55), (140, 72, 72), 0.95))


def _neutrophilic_dermatoses(c: Canvas) -> None:
    rng, u = c.rng, c.unit
    for _ in range(rng.integers(2, 5)):
        x, y = c.point(0.2)
        r = rng.uniform(12, 24) * u
        plaque = c.polygon(blob_outline(x, y, r, rng, 0.35), blur=4)
        c.paint(plaque, c.tint((185, 55, 95), (85, 32, 58), 0.9))
        # Swollen, almost vesicular centres look paler.
        core = c.polygon(blob_outline(x, y, 0.45 * r, rng, 0.3), blur=3)
        c.paint(core, c.tint((215, 125, 140), (125, 70, 90), 0.6))


def _prurigo_nodularis(c: Canvas) -> None:
    rng, u = c.rng, c.unit
    for _ in range(rng.integers(5, 12)):
        x, y = c.point(0.12)
        r = rng.uniform(4, 7.5) * u
        c.paint(c.circles(x, y, r, blur=1), c.tint((150, 95, 75), (38, 24, 20), 0.9))
        c.paint(c.circles(x - 0.35 * r, y - 0.35 * r, 0.35 * r, blur=1), (255, 255, 255), 0.3)
        # Scratched-open tops: the itch is what makes the nodules.
        dx, dy = rng.normal(0, 0.5 * r, 2)
        crust = c.line([(x - dx, y - dy), (x + dx, y + dy)], 1.5 * u, blur=0.4)
        c.paint(crust, c.tint((125, 30, 30), (45, 18, 16), 1.0))
    for _ in range(rng.integers(2, 6)):
        x, y = c.point(0.1)
        length, angle = rng.uniform(8, 20) * u, rng.uniform(0, np.pi)
        scratch = c.line([(x, y), (x + length * np.cos(angle), y + length * np.sin(angle))], u, 0.4)
        c.paint(scratch, c.tint((175, 55, 50), (70, 28, 25), 0.9), 0.7)


def _psoriasis(c: Canvas) -> None:
    rng, u = c.rng, c.unit
    for _ in range(rng.integers(1, 4)):
        x, y = c.point(0.25)
        r = rng.uniform(16, 30) * u
        plaque = c.polygon(blob_outline(x, y, r, rng, 0.2), blur=0.8)
        c.paint(plaque, c.tint((228, 125, 115), (112, 62, 72), 0.9))
        # Silvery scale in clumps: coarse noise for the clumps, fine noise for the flakes.
        flakes = (c.noise(12) * 0.6 + rng.random((c.size, c.size)) * 0.4) > 0.55
        c.paint(plaque**2 * flakes, c.tint((236, 234, 232), (205, 200, 202), 1.0), 0.85)


def _squamous_cell_carcinoma(c: Canvas) -> None:
    rng, u = c.rng, c.unit
    x, y = c.point(0.35)
    r = rng.uniform(16, 26) * u
    halo = c.polygon(blob_outline(x, y, 1.35 * r, rng, 0.2), blur=4)
    c.paint(halo, c.tint((215, 100, 90), (100, 45, 45), 0.6))
    rim = c.polygon(blob_outline(x, y, r, rng, 0.25), blur=1)
    c.paint(rim, c.tint((222, 196, 128), (150, 125, 80), 0.85))
    ulcer = c.polygon(blob_outline(x, y, 0.7 * r, rng, 0.3), blur=1)
    c.paint(ulcer, c.tint((170, 50, 45), (90, 30, 28), 0.9))
    crust = c.polygon(blob_outline(x, y, 0.5 * r, rng, 0.35), blur=0.8)
    c.paint(crust * (0.6 + 0.4 * c.noise(20)), c.tint((62, 38, 25), (30, 18, 12), 1.0))


def _other_condition(c: Canvas) -> None:
    rng, u = c.rng, c.unit
    patches = np.zeros((c.size, c.size), np.float32)
    for _ in range(rng.integers(2, 6)):
        x, y = c.point(0.15)
        r = rng.uniform(10, 30) * u
        patches = np.maximum(patches, c.polygon(blob_outline(x, y, r, rng, 0.35), blur=6))
    c.paint(patches, c.tint((215, 130, 115), (100, 60, 55), 0.55))
    dry = rng.random((c.size, c.size)) > 0.8
    c.paint(patches * dry, c.tint((232, 215, 205), (150, 130, 120), 1.0), 0.35)


_PAINTERS: dict[str, Callable[[Canvas], None]] = {
    "basal cell carcinoma": _basal_cell_carcinoma,
    "folliculitis": _folliculitis,
    "nematode infection": _nematode_infection,
    "neutrophilic dermatoses": _neutrophilic_dermatoses,
    "prurigo nodularis": _prurigo_nodularis,
    "psoriasis": _psoriasis,
    "squamous cell carcinoma": _squamous_cell_carcinoma,
}


def draw_lesion_image(label: str, fst: int, rng: np.random.Generator, size: int) -> Image.Image:
    """Draw a ``size``-pixel RGB clinical-photo-like image of ``label`` on skin of type ``fst``.

    The skin tone follows the Fitzpatrick skin type (FST -1, unknown, gets an intermediate tone);
    each of the seven conditions has its own lesion pattern, and any other label gets diffuse
    reddish patches. Everything random comes from ``rng``.
    """
    if fst not in SKIN_TONES:
        raise ValueError(f"unknown Fitzpatrick skin type {fst!r}; expected one of {VALID_FST}")
    skin = np.array(SKIN_TONES[fst]) * rng.uniform(0.95, 1.05) * rng.normal(1, 0.02, 3)
    canvas = skin_background(skin, rng, size)
    _PAINTERS.get(label, _other_condition)(canvas)
    image = Image.fromarray(np.clip(canvas.pixels, 0, 255).astype(np.uint8), "RGB")
    # A camera never renders perfectly sharp edges.
    return image.filter(ImageFilter.GaussianBlur(0.5 * size / 128))


# ---------------------------------------------------------------------------------------------
# Writing


def _rows(spec: DemoSpec) -> Iterator[tuple[str, int, int, int, int]]:
    """(label, condition index, FST, generator stream, index) of every image, in CSV order."""
    for index, label in enumerate(CONDITIONS):
        for fst, count in spec.per_condition:
            for k in range(count):
                yield label, index, fst, fst, k
        for fst in DISTRACTOR_FST:
            for k in range(spec.distractors_per_condition):
                yield label, index, fst, _DISTRACTOR_STREAM + max(fst, 0), k
    for fst in LIGHT_FST + DARK_FST:
        for k in range(spec.distractors_per_condition):
            yield EXTRA_CONDITION, len(CONDITIONS), fst, _DISTRACTOR_STREAM + fst, k


def planted_copy(image: Image.Image, rng: np.random.Generator, watermark: bool) -> bytes:
    """A copy as atlases hold them: cropped by 3-8% at a random place, resized to 70-85%,
    (with `watermark`, a small semi-transparent caption), re-encoded at JPEG quality 60-75."""
    width, height = image.size
    cut = rng.uniform(0.03, 0.08)
    w, h = round((1 - cut) * width), round((1 - cut) * height)
    x, y = rng.integers(0, width - w + 1), rng.integers(0, height - h + 1)
    scale = rng.uniform(0.7, 0.85)
    copy = image.crop((x, y, x + w, y + h)).resize((round(scale * w), round(scale * h)))
    if watermark:
        layer = Image.new("RGBA", copy.size, (0, 0, 0, 0))
        font = ImageFont.load_default(size=max(6, copy.height // 16))
        ImageDraw.Draw(layer).text(
            (copy.width // 30, copy.height * 9 // 10), "atlas", fill=(255, 255, 255, 140), font=font
        )
        copy = Image.alpha_composite(copy.convert("RGBA"), layer).convert("RGB")
    return _jpeg(copy, int(rng.integers(60, 76)))


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _write_into(folder: Path, seed: int, spec: DemoSpec, progress: bool) -> None:
    image_dir = folder / "images"
    image_dir.mkdir()
    records, copies = [], []

    def write(data: bytes, label: str, fst: int) -> str:
        md5 = hashlib.md5(data).hexdigest()
        path = image_dir / f"{md5}.jpg"
        if path.exists():
            raise RuntimeError(f"two demo images have the same md5 {md5}")
        path.write_bytes(data)
        nine, three = PARTITIONS.get(label, EXTRA_PARTITIONS)
        records.append((md5, fst, fst, label, nine, three, "", "", ""))
        return md5

    originals = {}
    rows = list(_rows(spec))
    for label, index, fst, stream, k in tqdm(rows, desc="demo images", disable=not progress):
        rng = np.random.default_rng([seed, index, stream, k])
        image = draw_lesion_image(label, fst, rng, spec.image_size)
        md5 = write(_jpeg(image, JPEG_QUALITY), label, fst)
        if k == 0 and stream == fst and fst in spec.copied_fst:
            originals[(index, fst)] = (md5, image)
    for n, ((index, fst), (md5, image)) in enumerate(sorted(originals.items())):
        rng = np.random.default_rng([seed, index, _COPY_STREAM + fst])
        copy = planted_copy(image, rng, watermark=n % 3 == 0)
        copy_fst = _FST_CONFLICT.get((index, fst), fst)
        copy_label = CONDITIONS[_LABEL_CONFLICT.get((index, fst), index)]
        copies.append((write(copy, copy_label, copy_fst), md5))
    with open(folder / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(FITZPATRICK17K_COLUMNS)
        writer.writerows(records)
    with open(folder / PLANTED_COPIES_FILE, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("md5hash", "copy_of"))
        writer.writerows(copies)


def write_demo_dataset(out_dir: Path, seed: int = 0, spec: DemoSpec = DemoSpec()) -> DemoDataset:
    """Write a demo dataset to ``out_dir`` (which must not exist yet) and return its paths.

    ``out_dir/metadata.csv`` has the Fitzpatrick17k columns; ``out_dir/images/<md5hash>.jpg``
    are the images. The same ``seed`` and ``spec`` give byte-identical files.
    """
    out_dir = Path(out_dir)
    try:
        with atomic_directory(out_dir) as tmp:
            _write_into(tmp, seed, spec, progress=False)
    except FileExistsError:
        raise SkindiffError(
            f"{out_dir} already exists; refusing to overwrite it (choose a new folder)"
        ) from None
    return DemoDataset(out_dir / "metadata.csv", out_dir / "images")


def default_demo_dataset(seed: int = 0) -> DemoDataset:
    """The demo dataset of ``seed`` in skindiff's cache, drawn on first use and re-used after."""
    out_dir = cached_directory(
        cache_dir() / f"demo-v{DEMO_VERSION}-seed{seed}",
        lambda folder: _write_into(folder, seed, DemoSpec(), progress=True),
    )
    dataset = DemoDataset(out_dir / "metadata.csv", out_dir / "images")
    if not dataset.metadata_csv.is_file():
        raise SkindiffError(f"{out_dir} is not a complete demo dataset; delete it to rebuild it")
    return dataset
