"""The pretraining corpus of the built-in `tiny` model: captioned photos of skin, procedurally.

It plays the role LAION plays for Stable Diffusion: skin of all six Fitzpatrick types, lit and
textured like the demo's photos, with generic marks (moles, freckles, scratches, red spots,
hairs) and captions that name the mark and the skin type in words. None of the seven study
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
}


def draw_corpus_image(seed: int, index: int, size: int) -> tuple[Image.Image, str, int]:
    """Corpus image `index` of `seed`: (image, caption, Fitzpatrick skin type)."""
    rng = corpus_rng(seed, index)
    fst = int(rng.integers(1, 7))
    mark = str(rng.choice(list(SKIN_MARKS)))
    canvas = skin_background(_tone(fst, rng), rng, size)
    if mark != "none":
        _PAINTERS[mark](canvas)
    image = Image.fromarray(np.clip(canvas.pixels, 0, 255).astype(np.uint8), "RGB")
    image = image.filter(ImageFilter.GaussianBlur(0.5 * size / 128))
    return image, skin_prompt(SKIN_MARKS[mark], fst), fst
