"""Seeds and seeded random generators: randomness from (seed, keys), never from global state.

A value drawn from `seeded_generator("order", seed, epoch)` depends only on those keys, so a
resumed or re-ordered computation repeats exactly what an uninterrupted one would do.
"""

import contextlib
import hashlib
import zlib
from collections.abc import Iterator

import numpy as np
import torch


def derived_seed(stream: str, *keys: int) -> int:
    """A 63-bit seed for the random stream `stream` (e.g. "order") at integer keys (seed, ...).

    The stream name and the key count are mixed in too: SeedSequence alone maps [s, 3] and
    [s, 3, 0] to the same state, which would correlate streams that should be independent.
    """
    entropy = [zlib.crc32(stream.encode()), len(keys), *(int(k) for k in keys)]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))


def seeded_generator(
    stream: str, *keys: int, device: torch.device | str = "cpu"
) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derived_seed(stream, *keys))


def image_seed(seed: int, md5hash: str, index: int) -> int:
    """Seed of one synthetic image: a stable 63-bit hash (Python's hash() varies per process)."""
    digest = hashlib.sha256(f"{seed}/{md5hash}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@contextlib.contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """Seeds torch's global CPU RNG for code that only uses it (peft init, embedding resize),
    restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
