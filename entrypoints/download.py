"""MLproject entry point `download`; its options: `skindiff download --help`."""

from skindiff.cli import run_entry_point

run_entry_point(__file__)
