"""The pretraining corpus of the built-in `tiny` model: captioned photos of skin, procedurally.

It plays the role LAION plays for Stable Diffusion: skin of all six Fitzpatrick types, lit and
textured like the demo's photos, with generic marks (moles, freckles, scratches, rashes, rings,
spots, patches, hairs...) in a wide range of colours, sizes and shapes, and captions that name
the mark and the skin type in words. The variety is what lets the autoencoder reconstruct, and
img2img keep, lesions it has never seen: a corpus of plain skin with a few small brown marks
teaches both that anything else is noise to be smoothed away. None of the seven study
conditions' patterns is drawn, so the model knows skin tones but not the conditions: a
condition's look has to come from Textual Inversion and LoRA, as with SD 2.1. Its random
streams are keyed apart from the demo dataset's, so no corpus image is a demo image.
"""

import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter

from skindiff.data.demo import SKIN_TONES, Canvas, blob_outline, skin_background
from skindiff.diffusion.prompts import SKIN_MARKS, skin_prompt

_STREAM = zlib.crc32(b"skindiff skin corpus")  # the demo's streams start with its seed


def corpus_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of corpus image `index`."""
    return np.random.default_rng([_STREAM, seed, index])


def _tone(fst: int, rng: np.random.Generator) -> np.ndarray:
    """A skin colour of type `fst`: its reference tone moved part of the way to a neighbour's,
    so the corpus covers the whole range between types, not six colours."""
    neighbour = int(np.clip(fst + rng.choice((-1, 1)), 1, 6))
    mix = rng.uniform(0, 0.35)
    tone = (1 - mix) * np.array(SKIN_TONES[fst]) + mix * np.array(SKIN_TONES[neighbour])
    return tone * rng.uniform(0.93, 1.07) * rng.normal(1, 0.02, 3)


RGB = tuple[int, int, int]


def _blotch(
    margin: float,
    radius: tuple[float, float],
    wobble: float,
    blur: float,
    light: RGB,
    dark: RGB,
    amount: float,
) -> Callable[[Canvas], None]:
    """A painter of one irregular patch (a mole, a red spot, a birthmark, a bruise): where,
    how large (in 128 px pixels), how irregular and soft, and its colour on light and dark skin."""

    def paint(c: Canvas) -> None:
        x, y = c.point(margin)
        r = c.rng.uniform(*radius) * c.unit
        patch = c.polygon(blob_outline(x, y, r, c.rng, wobble), blur=blur)
        c.paint(patch, c.tint(light, dark, amount))

    return paint


# Colours of generic marks on light skin (on dark skin they are darkened, see `_palette_tint`):
# red, pink, magenta, purple, brown, near-black, white, yellowish and dark red.
_PALETTE = (
    (205, 50, 55),
    (235, 135, 150),
    (190, 50, 120),
    (130, 60, 130),
    (120, 75, 50),
    (40, 25, 20),
    (250, 245, 240),
    (230, 205, 120),
    (120, 25, 30),
)


def _palette_tint(c: Canvas, amount: float) -> np.ndarray:
    """A random palette colour, jittered, as it shows on this canvas's skin."""
    colour = np.array(_PALETTE[c.rng.integers(len(_PALETTE))]) + c.rng.normal(0, 20, 3)
    light = np.clip(colour, 0, 255)
    dark = light * (0.75 if light.mean() > 200 else 0.5)
    return c.tint(tuple(light), tuple(dark), amount)


def _rash(c: Canvas) -> None:
    colour = c.tint((215, 95, 90), (100, 45, 48), c.rng.uniform(0.4, 0.8))
    for _ in range(c.rng.integers(2, 7)):
        x, y = c.point(0.1)
        r = c.rng.uniform(6, 18) * c.unit
        c.paint(c.polygon(blob_outline(x, y, r, c.rng, 0.4), blur=c.rng.uniform(2, 5)), colour)


def _ring(c: Canvas) -> None:
    x, y = c.point(0.3)
    r = c.rng.uniform(10, 28) * c.unit
    width = c.rng.uniform(0.12, 0.35) * r
    c.paint(c.circles(x, y, r, blur=c.rng.uniform(0.8, 3), width=width), _palette_tint(c, 0.8))


def _spots(c: Canvas) -> None:
    count = c.rng.integers(4, 40)
    xs, ys = c.rng.uniform(0, c.size, (2, count))
    rs = c.rng.uniform(1.5, 5, count) * c.unit
    c.paint(c.circles(xs, ys, rs, blur=c.rng.uniform(0.3, 1.5)), _palette_tint(c, 0.85))


def _patch(c: Canvas) -> None:
    """One irregular patch of any palette colour, plain or speckled."""
    x, y = c.point(0.2)
    r = c.rng.uniform(6, 30) * c.unit
    outline = blob_outline(x, y, r, c.rng, c.rng.uniform(0.05, 0.45))
    patch = c.polygon(outline, blur=c.rng.uniform(0.5, 4))
    if c.rng.random() < 0.3:
        patch = patch * (c.noise(int(c.rng.integers(6, 24))) > c.rng.uniform(0.3, 0.6))
    c.paint(patch, _palette_tint(c, c.rng.uniform(0.5, 0.95)))


def _layered_lesion(c: Canvas) -> None:
    """Two to three nested irregular patches of different palette colours."""
    x, y = c.point(0.3)
    r = c.rng.uniform(10, 28) * c.unit
    for scale in (1.0, 0.6, 0.3)[: c.rng.integers(2, 4)]:
        outline = blob_outline(x, y, scale * r, c.rng, c.rng.uniform(0.05, 0.35))
        c.paint(c.polygon(outline, blur=c.rng.uniform(0.5, 3)), _palette_tint(c, 0.85))


def _streak(c: Canvas) -> None:
    """A wandering line: a scratch mark, a vein, a thread of colour."""
    x, y = c.point(0.15)
    heading, path = c.rng.uniform(0, 2 * np.pi), [(x, y)]
    for _ in range(int(c.rng.integers(6, 20))):
        heading += c.rng.normal(0, 0.5)
        x, y = x + 4 * c.unit * np.cos(heading), y + 4 * c.unit * np.sin(heading)
        path.append((x, y))
    width = c.rng.uniform(1, 5) * c.unit
    c.paint(c.line(path, width, blur=c.rng.uniform(0.3, 1.5)), _palette_tint(c, 0.85))


def _freckles(c: Canvas) -> None:
    count = c.rng.integers(15, 50)
    xs, ys = c.rng.uniform(0, c.size, (2, count))
    rs = c.rng.uniform(0.8, 2.0, count) * c.unit
    c.paint(c.circles(xs, ys, rs, blur=0.8), c.tint((185, 120, 80), (60, 38, 26), 0.5))


def _scratch(c: Canvas) -> None:
    x, y = c.point(0.15)
    length, angle = c.rng.uniform(20, 60) * c.unit, c.rng.uniform(0, np.pi)
    end = (x + length * np.cos(angle), y + length * np.sin(angle))
    c.paint(c.line([(x, y), end], 1.5 * c.unit, blur=0.5), c.tint((190, 80, 70), (80, 35, 30), 0.8))


def _hair(c: Canvas) -> None:
    for _ in range(c.rng.integers(4, 12)):
        x, y = c.rng.uniform(0, c.size, 2)
        length, angle = c.rng.uniform(10, 30) * c.unit, c.rng.normal(0.8, 0.3)
        end = (x + length * np.cos(angle), y + length * np.sin(angle))
        c.paint(c.line([(x, y), end], 0.8 * c.unit), c.tint((60, 40, 30), (20, 14, 10), 0.9), 0.8)


def _scar(c: Canvas) -> None:
    x, y = c.point(0.2)
    length, angle = c.rng.uniform(15, 40) * c.unit, c.rng.uniform(0, np.pi)
    end = (x + length * np.cos(angle), y + length * np.sin(angle))
    c.paint(
        c.line([(x, y), end], 3 * c.unit, blur=1), c.tint((245, 225, 215), (175, 150, 140), 0.7)
    )


_PAINTERS = {
    "mole": _blotch(0.2, (3, 9), 0.1, 1, (95, 60, 40), (30, 18, 12), 0.95),
    "freckles": _freckles,
    "scratch": _scratch,
    "spot": _blotch(0.2, (4, 12), 0.2, 2.5, (215, 110, 100), (105, 50, 50), 0.7),
    "hair": _hair,
    "birthmark": _blotch(0.25, (10, 26), 0.4, 3, (200, 140, 110), (70, 45, 35), 0.6),
    "bruise": _blotch(0.25, (8, 20), 0.3, 5, (120, 80, 130), (50, 35, 60), 0.6),
    "scar": _scar,
    "rash": _rash,
    "ring": _ring,
    "spots": _spots,
    "patch": _patch,
    "lesion": _layered_lesion,
    "streak": _streak,
}


# How many marks an image has (after "none"): mostly one, sometimes two or three, so the
# corpus also shows marks side by side.
_MARK_COUNTS = (1, 2, 3)
_MARK_COUNT_SHARES = (0.6, 0.3, 0.1)


def draw_corpus_image(seed: int, index: int, size: int) -> tuple[Image.Image, str, int]:
    """Corpus image `index` of `seed`: (image, caption, Fitzpatrick skin type)."""
    rng = corpus_rng(seed, index)
    fst = int(rng.integers(1, 7))
    canvas = skin_background(_tone(fst, rng), rng, size)
    marks = ["none"]
    if rng.random() >= 1 / len(SKIN_MARKS):
        count = rng.choice(_MARK_COUNTS, p=_MARK_COUNT_SHARES)
        marks = list(rng.choice([m for m in SKIN_MARKS if m != "none"], count, replace=False))
        for mark in marks:
            _PAINTERS[mark](canvas)
    image = Image.fromarray(np.clip(canvas.pixels, 0, 255).astype(np.uint8), "RGB")
    image = image.filter(ImageFilter.GaussianBlur(0.5 * size / 128))
    return image, skin_prompt(" and ".join(SKIN_MARKS[m] for m in marks), fst), fst
