"""MLproject entry point `evaluate`; its options: `skindiff evaluate --help`."""

from skindiff.cli import run_entry_point

run_entry_point(__file__)
