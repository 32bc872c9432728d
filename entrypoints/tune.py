"""MLproject entry point `tune`; its options: `skindiff tune --help`."""

from skindiff.cli import run_entry_point

run_entry_point(__file__)
