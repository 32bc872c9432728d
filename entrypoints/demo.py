"""MLproject entry point `demo`; its options: `skindiff demo --help`."""

from skindiff.cli import run_entry_point

run_entry_point(__file__)
