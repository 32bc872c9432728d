"""Where skindiff keeps things it can rebuild, and how it writes folders safely."""

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path


def cache_dir() -> Path:
    """Root of skindiff's rebuildable files: ``$SKINDIFF_CACHE`` or ``~/.cache/skindiff``."""
    root = os.environ.get("SKINDIFF_CACHE") or Path.home() / ".cache" / "skindiff"
    return Path(root).expanduser()


@contextlib.contextmanager
def atomic_directory(out_dir: Path) -> Iterator[Path]:
    """Yields a temporary sibling of `out_dir` to fill; renames it to `out_dir` on success.

    A process killed mid-way leaves at most a hidden temporary folder, never a half-written
    `out_dir`. Raises FileExistsError if `out_dir` exists, before or by the time of the rename.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A sibling is on the same file system, so the rename is atomic.
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()  # unlike tempfile.mkdtemp, keeps the user's umask instead of mode 700
    try:
        yield tmp
        try:
            os.rename(tmp, out_dir)
        except OSError as err:
            # Someone else created out_dir meanwhile (on Linux, rename only replaces empty dirs).
            if not out_dir.exists():
                raise
            raise FileExistsError(out_dir) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_directory(out_dir: Path, build: Callable[[Path], None]) -> Path:
    """`out_dir`, built by `build(folder)` on first use; safe when processes race to build it."""
    if not out_dir.exists():
        # Losing a race to another process is fine: its copy is complete, as it was renamed.
        with contextlib.suppress(FileExistsError), atomic_directory(out_dir) as tmp:
            build(tmp)
    return out_dir
