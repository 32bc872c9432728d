"""MLproject entry point `ablation`; its options: `skindiff ablation --help`."""

from skindiff.cli import run_entry_point

run_entry_point(__file__)
