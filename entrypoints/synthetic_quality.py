"""MLproject entry point `synthetic_quality`; its options: `skindiff synthetic_quality --help`."""

from skindiff.cli import run_entry_point

run_entry_point(__file__)
