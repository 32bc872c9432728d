"""Benchmarks of skindiff's hot paths against the reference way; run them as
`python -m benchmarks.<name>` from the repository root (see README.md here)."""

# First, before torch loads: skindiff sets the OpenMP thread policy it runs with.
import skindiff  # noqa: F401
