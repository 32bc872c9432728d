"""Where skindiff keeps things it can rebuild: the demo dataset, built-in models, caches."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of skindiff's rebuildable files: ``$SKINDIFF_CACHE`` or ``~/.cache/skindiff``."""
    root = os.environ.get("SKINDIFF_CACHE") or Path.home() / ".cache" / "skindiff"
    return Path(root).expanduser()
