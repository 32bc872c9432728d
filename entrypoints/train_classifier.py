"""MLproject entry point `train_classifier`; its options: `skindiff train_classifier --help`."""

from skindiff.cli import run_entry_point

run_entry_point(__file__)
