"""Image files behind the metadata: safe path resolution, integrity checks, RGB loading."""

import hashlib
import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePath

import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from skindiff.data.metadata import describe_lines
from skindiff.data.skin_tone import measured_ita
from skindiff.errors import DataValidationError

_SHOWN = 5
log = logging.getLogger(__name__)


def resolve_image_path(image_dir: Path, relative: str) -> Path:
    """`image_dir / relative`, refusing absolute paths and `..` that would leave `image_dir`."""
    normalised = os.path.normpath(relative)
    if PurePath(relative).is_absolute() or normalised.split(os.sep)[0] == os.pardir:
        raise DataValidationError(f"image path {relative!r} escapes the image folder {image_dir}")
    return Path(image_dir) / normalised


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of any PIL image; transparent pixels become white rather than black."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: Path) -> Image.Image:
    """Decodes an image file (grayscale, palette, RGBA, CMYK, ...) as RGB."""
    with Image.open(path) as image:
        image.load()  # decode before the file closes; to_rgb returns RGB images as they are
        return to_rgb(image)


@dataclass(frozen=True)
class _Inspection:
    sha256: str | None = None  # None when the file cannot be used
    problem: str | None = None
    ita: float = float("nan")  # skin tone (skin_tone.py); NaN where no skin is measurable


def _inspect(path: Path) -> _Inspection:
    """The file's sha256 and skin tone when it decodes, else what is wrong."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return _Inspection(problem="missing")
    except OSError as err:
        return _Inspection(problem=f"unreadable: {err.strerror or err}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            # JPEGs decode at a reduced scale here, which still reads every byte of the stream
            # and keeps enough pixels for the skin tone, which needs no detail.
            image.draft("RGB", (64, 64))
            image.load()
            ita = measured_ita(to_rgb(image))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return _Inspection(problem=f"corrupt: {err}")
    return _Inspection(hashlib.sha256(data).hexdigest(), ita=ita)


@dataclass(frozen=True)
class CheckedImages:
    """Rows whose image decodes (with absolute `path`, file `sha256` and the skin tone `ita`,
    NaN where the image shows too little skin), and rows dropped."""

    rows: pd.DataFrame
    dropped: pd.DataFrame  # md5hash, line, path, problem


def check_images(
    frame: pd.DataFrame, image_dir: Path, *, skip_missing: bool = False
) -> CheckedImages:
    """Checks that every row's image exists and decodes; all problems are reported together.

    With `skip_missing`, rows with missing or corrupt images are dropped instead of refused.
    A path escaping `image_dir` is always an error.
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise DataValidationError(f"image folder not found: {image_dir}")
    paths = []
    for line, relative in zip(frame["line"], frame["path"], strict=True):
        try:
            paths.append(resolve_image_path(image_dir, relative))
        except DataValidationError as err:
            raise DataValidationError(f"metadata line {line}: {err}") from None

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = list(
            tqdm(pool.map(_inspect, paths), total=len(paths), desc="checking images", unit="img")
        )
    rows = frame.assign(
        path=[str(path.resolve()) for path in paths],
        sha256=[result.sha256 for result in results],
        ita=[round(result.ita, 2) for result in results],
    )
    problem = pd.Series([result.problem for result in results], index=frame.index)
    bad = problem.notna()
    dropped = rows.loc[bad, ["md5hash", "line", "path"]].assign(problem=problem[bad])
    if bad.any() and not skip_missing:
        raise DataValidationError(
            f"{image_dir}: {len(dropped)} of {len(frame)} images cannot be used: "
            f"{_describe_problems(dropped)}. Fix them, or set skip_missing "
            "(--skip-missing true) to drop those rows"
        )
    if bad.any():
        log.warning(
            "%s: dropped %d of %d rows: %s",
            image_dir,
            len(dropped),
            len(frame),
            _describe_problems(dropped),
        )
    return CheckedImages(rows=rows.loc[~bad].reset_index(drop=True), dropped=dropped)


def _describe_problems(dropped: pd.DataFrame) -> str:
    """'3 missing (a.jpg, ...; line 4, ...) and 1 unreadable (b.jpg: corrupt: ...)'."""
    missing = dropped[dropped["problem"] == "missing"]
    broken = dropped[dropped["problem"] != "missing"]
    parts = []
    if len(missing):
        names = [Path(p).name for p in missing["path"].head(_SHOWN)]
        parts.append(
            f"{len(missing)} missing ({', '.join(names)}"
            f"{' ...' if len(missing) > _SHOWN else ''}; {describe_lines(missing['line'])})"
        )
    if len(broken):
        shown = [
            f"{Path(p).name}: {why}"
            for p, why in zip(broken["path"], broken["problem"], strict=True)
        ]
        parts.append(
            f"{len(broken)} unreadable ({'; '.join(shown[:_SHOWN])}"
            f"{' ...' if len(broken) > _SHOWN else ''})"
        )
    return " and ".join(parts)
