"""MLproject entry point `main`; its options: `skindiff main --help`."""

from skindiff.cli import run_entry_point

run_entry_point(__file__)
