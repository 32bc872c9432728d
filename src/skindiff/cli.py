"""`skindiff` command line: one command per stage (the MLproject entry points call these)."""

import logging
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from skindiff.data.fitzpatrick import CONDITIONS, PAPER_SEEDS
from skindiff.errors import SkindiffError

app = typer.Typer(
    help="Diffusion-based augmentation of under-represented skin types, tracked with MLflow.\n\n"
    "Every stage logs an MLflow run to MLFLOW_TRACKING_URI (default: the local store).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


class Scenario(StrEnum):
    i = "i"
    ii = "ii"
    iii = "iii"


ALL_CONDITIONS = ",".join(CONDITIONS)
ALL_PAPER_SEEDS = ",".join(map(str, PAPER_SEEDS))


def comma_list(text: str) -> tuple[str, ...]:
    """'a, b,c' -> ('a', 'b', 'c')."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def int_list(text: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(item) for item in comma_list(text))
    except ValueError:
        raise SkindiffError(f"{name} must be a comma list of integers, got {text!r}") from None


MetadataCsv = Annotated[
    str,
    typer.Option(help="Fitzpatrick17k-format metadata CSV. Empty: the embedded demo dataset."),
]
ImageDir = Annotated[
    str,
    typer.Option(
        help="Folder of the images (<md5hash>.jpg, or the CSV's `path` column relative to it). "
        "Empty: the embedded demo dataset."
    ),
]
SeedOption = Annotated[int, typer.Option(help="Repeat seed: picks the flexible subsets.")]
ValFraction = Annotated[
    float,
    typer.Option(
        help="Share of each (condition, skin group) of the training set held out for "
        "validation. 0 gives the paper's split sizes."
    ),
]
Conditions = Annotated[str, typer.Option(help="Comma list of the conditions (labels) to classify.")]
LightFst = Annotated[str, typer.Option(help="Comma list of the majority (light) skin types.")]
DarkFst = Annotated[str, typer.Option(help="Comma list of the minority (dark) skin types.")]


class Switch(StrEnum):
    """A boolean option that takes a value (`--skip-missing true`), as MLflow params do."""

    true = "true"
    false = "false"


SkipMissing = Annotated[
    Switch,
    typer.Option(
        help="true: drop rows whose image is missing or corrupt (listed in "
        "splits/dropped_images.csv) instead of stopping.",
    ),
]


def prepare_config(
    metadata_csv: str,
    image_dir: str,
    scenario: str,
    seed: int,
    val_fraction: float,
    conditions: str,
    light_fst: str,
    dark_fst: str,
    skip_missing: Switch,
):
    from skindiff.data.prepare import PrepareConfig

    return PrepareConfig(
        metadata_csv=metadata_csv,
        image_dir=image_dir,
        scenario=scenario,
        seed=seed,
        val_fraction=val_fraction,
        conditions=comma_list(conditions),
        light_fst=int_list(light_fst, "light_fst"),
        dark_fst=int_list(dark_fst, "dark_fst"),
        skip_missing=skip_missing is Switch.true,
    )


@app.command()
def prepare(
    metadata_csv: MetadataCsv = "",
    image_dir: ImageDir = "",
    scenario: Annotated[
        Scenario, typer.Option(help="i: train on light+dark; ii: light + a few dark; iii: light.")
    ] = Scenario.i,
    seed: SeedOption = 0,
    val_fraction: ValFraction = 0.1,
    conditions: Conditions = ALL_CONDITIONS,
    light_fst: LightFst = "1,2",
    dark_fst: DarkFst = "5,6",
    skip_missing: SkipMissing = Switch.false,
) -> None:
    """Validate the dataset and write one scenario's train/val/test manifests (MLflow run)."""
    from skindiff.tracking.prepare import run_prepare

    config = prepare_config(
        metadata_csv,
        image_dir,
        scenario.value,
        seed,
        val_fraction,
        conditions,
        light_fst,
        dark_fst,
        skip_missing,
    )
    run_id = run_prepare(config)
    typer.echo(f"prepare run {run_id}: splits/train.csv, splits/val.csv, splits/test.csv logged")


@app.command()
def main(
    scenarios: Annotated[
        str, typer.Option(help="Comma list of scenarios (i, ii, iii).")
    ] = "i,ii,iii",
    seeds: Annotated[str, typer.Option(help="Comma list of repeat seeds.")] = ALL_PAPER_SEEDS,
    metadata_csv: MetadataCsv = "",
    image_dir: ImageDir = "",
    val_fraction: ValFraction = 0.1,
    conditions: Conditions = ALL_CONDITIONS,
    light_fst: LightFst = "1,2",
    dark_fst: DarkFst = "5,6",
    skip_missing: SkipMissing = Switch.false,
) -> None:
    """Run the whole study for each scenario and seed, one parent MLflow run per pair."""
    from skindiff.tracking.pipeline import run_main

    chosen = comma_list(scenarios)
    unknown = [s for s in chosen if s not in set(Scenario)]
    if unknown or not chosen:
        raise SkindiffError(f"scenarios must be a comma list of i, ii, iii, got {scenarios!r}")
    base = prepare_config(
        metadata_csv,
        image_dir,
        chosen[0],
        0,
        val_fraction,
        conditions,
        light_fst,
        dark_fst,
        skip_missing,
    )
    runs = run_main(chosen, int_list(seeds, "seeds"), base)
    for (scenario, seed), run_id in runs.items():
        typer.echo(f"scenario {scenario}, seed {seed}: prepare run {run_id}")


@app.command("demo-data")
def demo_data(
    output: Annotated[Path, typer.Argument(help="New folder to write (must not exist).")],
    seed: Annotated[int, typer.Option(help="Seed of the drawing; same seed, same files.")] = 0,
) -> None:
    """Write the embedded demo dataset (Fitzpatrick17k-format CSV + JPEGs) to a folder."""
    from skindiff.data.demo import write_demo_dataset

    demo = write_demo_dataset(output, seed=seed)
    typer.echo(f"metadata: {demo.metadata_csv}\nimages:   {demo.image_dir}")


def run_entry_point(script: str) -> None:
    """Body of `entrypoints/<stage>.py`: runs the command named like the script."""
    run([Path(script).stem, *sys.argv[1:]])


def run(argv: list[str] | None = None) -> None:
    """Runs the CLI; input errors end in one line on stderr and exit code 2, not a traceback."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    package_log = logging.getLogger("skindiff")
    package_log.addHandler(handler)
    package_log.setLevel(logging.INFO)
    try:
        app(args=argv, prog_name="skindiff")
    except SkindiffError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
