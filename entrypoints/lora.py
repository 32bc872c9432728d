"""MLproject entry point `lora`; its options: `skindiff lora --help`."""

from skindiff.cli import run_entry_point

run_entry_point(__file__)
