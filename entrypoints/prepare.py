"""MLproject entry point `prepare`; its options: `skindiff prepare --help`."""

from skindiff.cli import run_entry_point

run_entry_point(__file__)
