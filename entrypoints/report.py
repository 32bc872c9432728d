"""MLproject entry point `report`; its options: `skindiff report --help`."""

from skindiff.cli import run_entry_point

run_entry_point(__file__)
