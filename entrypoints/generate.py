"""MLproject entry point `generate`; its options: `skindiff generate --help`."""

from skindiff.cli import run_entry_point

run_entry_point(__file__)
