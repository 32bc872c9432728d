"""MLproject entry point `textual_inversion`; its options: `skindiff textual_inversion --help`."""

from skindiff.cli import run_entry_point

run_entry_point(__file__)
