"""Where skindiff keeps what it can rebuild, and how it writes files and folders safely.

Every write here is atomic (a temporary sibling with a unique name, then a rename), so a killed
process leaves at most a hidden temporary, never a half-written file, and two processes never
write through the same temporary. A work folder is worked in by one process at a time
(`work_folder_lock`): another one waits, then finds the work done.
"""

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import struct
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout

from skindiff.errors import SkindiffError

log = logging.getLogger(__name__)

IDENTITY_FILE = "run.json"


def cache_dir() -> Path:
    """Root of skindiff's rebuildable files: ``$SKINDIFF_CACHE`` or ``~/.cache/skindiff``."""
    root = os.environ.get("SKINDIFF_CACHE") or Path.home() / ".cache" / "skindiff"
    return Path(root).expanduser()


def _temporary_sibling(path: Path) -> Path:
    # A sibling is on the same file system, so the rename is atomic.
    return path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"


def write_atomic(path: Path, data: bytes) -> None:
    """Writes `path` whole or not at all. No fsync: a file lost to a power cut comes back empty
    or short, and the stages that resume check what they find."""
    tmp = _temporary_sibling(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(out_dir: Path) -> Iterator[Path]:
    """Yields a temporary sibling of `out_dir` to fill; renames it to `out_dir` on success.

    Raises FileExistsError if `out_dir` exists, before or by the time of the rename.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(out_dir)
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


@contextlib.contextmanager
def replaced_directory(target: Path) -> Iterator[Path]:
    """A fresh folder to fill that atomically becomes `target`, dropping what an earlier,
    interrupted finish left there."""
    shutil.rmtree(target, ignore_errors=True)
    with atomic_directory(target) as tmp:
        yield tmp


@contextlib.contextmanager
def work_folder_lock(folder: Path, holder: str | None = None) -> Iterator[str]:
    """Holds the lock of work folder `folder` for the block, waiting while another process
    holds it; the operating system lets go of it when a holder dies, however it dies.

    Re-entrant within a process, so a caller may hold it around code that takes it again. With
    `holder` (e.g. a tracking run id), records it for the block and yields the holder recorded
    by a process that died holding the folder ("" when every earlier holder let go of it).
    The lock and the record are hidden siblings of `folder`; they stay, empty or tiny."""
    folder = Path(folder).absolute()
    # One instance per path in a process, so that taking it again nests instead of deadlocking.
    lock = FileLock(folder.parent / f".{folder.name}.lock", is_singleton=True)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(blocking=False)
        except Timeout:
            log.warning("%s is in use by another process; waiting until it is done", folder)
            lock.acquire()
    except OSError as err:  # a parent that is a file, or not writable
        raise SkindiffError(f"cannot lock the work folder {folder}: {err}") from None
    try:
        if holder is None:
            yield ""
            return
        record = folder.parent / f".{folder.name}.holder"
        previous = record.read_text() if record.is_file() else ""
        write_atomic(record, holder.encode())
        try:
            yield previous
        finally:
            record.unlink(missing_ok=True)
    finally:
        lock.release()


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cached_arrays(
    folder: Path,
    digests: Sequence[str],
    compute: Callable[[list[int]], Sequence[np.ndarray] | np.ndarray],
) -> np.ndarray:
    """One array per item, stacked: read from `<folder>/<digest>.npy` where an item with the
    same content digest was computed before; the others computed by `compute(indices)` (one
    index per missing digest, so identical files are computed once), stored, then read."""
    files = [Path(folder) / f"{digest}.npy" for digest in digests]
    first_missing = {}
    for i, file in enumerate(files):
        if digests[i] not in first_missing and not file.is_file():
            first_missing[digests[i]] = i
    if first_missing:
        indices = list(first_missing.values())
        Path(folder).mkdir(parents=True, exist_ok=True)
        for i, values in zip(indices, compute(indices), strict=True):
            buffer = io.BytesIO()
            np.save(buffer, np.asarray(values), allow_pickle=False)
            write_atomic(files[i], buffer.getvalue())
    return np.stack([np.load(file) for file in files])


def claim_folder(folder: Path, identity: dict[str, Any]) -> None:
    """Makes `folder` the work folder of what `identity` describes, or checks that it already is.

    The identity is stored in `run.json`; a folder holding other work, or files without a
    `run.json`, is refused, so outputs made from other settings or inputs are never mixed in.
    """
    identity = json.loads(json.dumps(identity))  # tuples -> lists, as the stored copy has them
    record = Path(folder) / IDENTITY_FILE
    if record.is_file():
        differing = _differing_keys(json.loads(record.read_text()), identity)
        if differing:
            raise SkindiffError(
                f"{folder} holds work made with other settings or inputs "
                f"({', '.join(differing)}); use another folder or delete it rather than mixing"
            )
        return
    if Path(folder).is_dir() and any(Path(folder).iterdir()):
        raise SkindiffError(f"{folder} is not empty and holds no {IDENTITY_FILE}")
    Path(folder).mkdir(parents=True, exist_ok=True)
    write_atomic(record, json.dumps(identity, indent=2, sort_keys=True).encode())


def _differing_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        left, right = a.get(key), b.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            out += _differing_keys(left, right, f"{prefix}{key}.")
        elif left != right:
            out.append(prefix + key)
    return out


def canonical_safetensors(path: Path) -> None:
    """Rewrites a safetensors file's header with sorted keys, in place. The library writes its
    metadata from a hash map whose order changes from process to process, so the same tensors
    and metadata would give other bytes; sorted, they give the same bytes anywhere."""
    data = Path(path).read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > size:  # never the case for a reordering; keep the file as it is
        return
    write_atomic(Path(path), data[:8] + text.ljust(size) + data[8 + size :])
