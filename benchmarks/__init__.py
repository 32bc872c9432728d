"""Benchmarks of skindiff's hot paths against the reference way; run them as
`python -m benchmarks.<name>` from the repository root (see README.md here)."""

from skindiff.core.threads import choose_thread_policy

# A benchmark is a command: like `skindiff`'s, it sets the OpenMP thread policy before torch
# loads (the runtime reads it once).
choose_thread_policy()
