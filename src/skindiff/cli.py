"""`skindiff` command line: one command per stage (the MLproject entry points call these).

A stage's options are made from its config dataclasses, so a config field, its CLI option, its
help text and its MLflow param are one thing: `TextualInversionConfig.learning_rate` is
`--ti-learning-rate` and `-P ti_learning_rate=...`. Booleans take a value (`--skip-missing
true`) and tuples a comma list (`--conditions "psoriasis,folliculitis"`), as MLflow params do;
an empty value is "none" (no run id, the demo data, ...).

Only the config classes are imported here: torch, diffusers and MLflow load when a command runs.
"""

import contextlib
import inspect
import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from enum import Enum, StrEnum
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, NoReturn

import typer

from skindiff.core.files import cache_dir
from skindiff.core.settings import as_text
from skindiff.core.threads import choose_thread_policy
from skindiff.errors import SkindiffError
from skindiff.options import (
    ABLATION,
    ABLATION_STUDY,
    CLASSIFIER,
    DATA,
    DEMO_PLAN,
    DEMO_STUDY,
    DOWNLOAD,
    DRY_RUN,
    EVALUATE,
    GENERATE,
    LORA,
    MAIN_STUDY,
    PRETRAIN,
    PRETRAIN_TARGET,
    QUALITY,
    REPORT,
    RUNS,
    STUDY,
    TEXTUAL_INVERSION,
    TRACKING,
    TUNE,
    TUNE_STUDY,
    Option,
    OptionGroup,
    StudyGroups,
)
from skindiff.plans import TrackingConfig

app = typer.Typer(
    help="Diffusion-based augmentation of under-represented skin types, tracked with MLflow.\n\n"
    "Every stage logs an MLflow run to MLFLOW_TRACKING_URI (default: ./mlflow.db). With no "
    "options, stages run on the embedded demo dataset and the built-in `tiny` model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


class Switch(StrEnum):
    true = "true"
    false = "false"


def _cli_annotation(option: Option) -> tuple[Any, Any]:
    """(type typer understands, default) of an option: choices for enums and booleans, text for
    lists and optional values (the config parses them)."""
    kind = option.kind
    if kind is bool:
        return Switch, Switch(str(option.default).lower())
    if isinstance(kind, type) and issubclass(kind, Enum):
        return kind, option.default
    if kind in (int, float, str):
        return kind, option.default
    return str, as_text(option.default)


# Stage commands that are MLproject entry points, in the order MLproject lists them: the
# commands that log to the tracking server.
ENTRY_POINTS = (
    "main",
    "demo",
    "tune",
    "prepare",
    "textual_inversion",
    "lora",
    "generate",
    "train_classifier",
    "evaluate",
    "synthetic_quality",
    "ablation",
    "report",
    "download",
)

# The options of each stage command, in order: its CLI options and its MLproject parameters.
# A tracked command also takes TRACKING's options, which are no MLproject parameter: `mlflow run`
# has chosen the experiment before the entry point starts (`mlflow run --experiment-name`).
COMMAND_OPTIONS: dict[str, list[Option]] = {}


def _command_options(groups: dict[str, OptionGroup | StudyGroups]) -> list[Option]:
    options: dict[str, Option] = {}
    for group in groups.values():
        for option in group.options():
            # A shared option (seed, base_model, ...): the first group that has it shows it.
            options.setdefault(option.name, option)
    return list(options.values())


def _parameter(option: Option) -> inspect.Parameter:
    kind, default = _cli_annotation(option)
    return inspect.Parameter(
        option.name,
        inspect.Parameter.KEYWORD_ONLY,
        default=default,
        annotation=Annotated[
            kind, typer.Option(help=option.help, show_default=True, envvar=option.env)
        ],
    )


def _flag_or_parameter(option: Option) -> inspect.Parameter:
    """An option of the command line only (no MLflow param): a boolean is a plain flag
    (`--dry-run`), as nothing has to pass it as text."""
    if option.kind is not bool:
        return _parameter(option)
    flag = typer.Option(f"--{option.name.replace('_', '-')}", help=option.help)
    return inspect.Parameter(
        option.name, inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[bool, flag]
    )


def stage_command(name: str, **groups: OptionGroup | StudyGroups) -> Callable:
    """Registers `body(**configs)` as the command `name`: one option per config field of the
    `groups`, and the body gets each group's config under the group's keyword."""

    tracked = name in ENTRY_POINTS

    def register(body: Callable) -> Callable:
        def command(**values: Any) -> None:
            configs = {key: group.build(values) for key, group in groups.items()}
            if tracked:
                _run_tracked(body, configs, TRACKING.build(values))
            else:
                body(**configs)

        # A dry run's options, like TRACKING's, are the command line's, not MLproject's.
        COMMAND_OPTIONS[name] = _command_options(
            {key: group for key, group in groups.items() if group is not DRY_RUN}
        )
        parameters = [_parameter(option) for option in COMMAND_OPTIONS[name]]
        if DRY_RUN in groups.values():
            parameters += [_flag_or_parameter(option) for option in DRY_RUN.options()]
        if tracked:
            parameters += [_parameter(option) for option in TRACKING.options()]
        command.__signature__ = inspect.Signature(parameters)
        command.__doc__ = body.__doc__
        app.command(name)(command)
        return body

    return register


def _run_tracked(body: Callable, configs: dict[str, Any], tracking: TrackingConfig) -> None:
    """Runs a command that logs to the tracking server, in `tracking`'s experiment; a follower
    process of a launch helps the main process, which logs."""
    from skindiff.core.distributed import follow_main_process, is_follower, release_followers

    if is_follower():
        follow_main_process()
        return
    from skindiff.tracking.access import require_tracking_access
    from skindiff.tracking.experiment import use_experiment

    require_tracking_access()
    use_experiment(tracking.experiment_name)
    body(**configs)
    release_followers()


@stage_command("prepare", data=DATA)
def prepare(data) -> None:
    """Validate the dataset and write one scenario's train/val/test manifests (MLflow run)."""
    from skindiff.tracking.prepare import run_prepare

    run_id = run_prepare(data)
    typer.echo(f"prepare run {run_id}: splits/train.csv, splits/val.csv, splits/test.csv logged")


@stage_command(
    "textual_inversion",
    data=DATA,
    config=TEXTUAL_INVERSION,
    runs=RUNS.only("prepare_run_id"),
)
def textual_inversion(data, config, runs) -> None:
    """Learn one Textual Inversion token per condition on the training split (MLflow run)."""
    from skindiff.tracking.textual_inversion import run_textual_inversion

    run_id = run_textual_inversion(data, config, runs.prepare_run_id)
    typer.echo(f"textual_inversion run {run_id}: embeddings/*.safetensors logged")


@stage_command(
    "lora",
    data=DATA,
    ti_config=TEXTUAL_INVERSION,
    config=LORA,
    runs=RUNS.only("prepare_run_id", "ti_run_id", "use_ti"),
)
def lora(data, ti_config, config, runs) -> None:
    """Fine-tune the UNet with LoRA, captions naming the TI tokens and skin type (MLflow run)."""
    from skindiff.tracking.lora import run_lora

    ti_run_id, ti_config = (runs.ti_run_id, ti_config) if runs.use_ti else (None, None)
    run_id = run_lora(data, config, runs.prepare_run_id, ti_run_id, ti_config)
    typer.echo(f"lora run {run_id}: lora/pytorch_lora_weights.safetensors logged")


@stage_command(
    "generate",
    data=DATA,
    ti_config=TEXTUAL_INVERSION,
    lora_config=LORA,
    config=GENERATE,
    runs=RUNS.only("prepare_run_id", "ti_run_id", "lora_run_id", "generator_uri"),
)
def generate(data, ti_config, lora_config, config, runs) -> None:
    """Generate synthetic variants of every training image (img2img by default; MLflow run)."""
    from skindiff.tracking.generate import run_generate

    run_id = run_generate(
        data,
        ti_config,
        lora_config,
        config,
        runs.prepare_run_id,
        runs.ti_run_id,
        runs.lora_run_id,
        runs.generator_uri,
    )
    typer.echo(f"generate run {run_id}: synthetic/manifest.csv and images logged")


@stage_command(
    "train_classifier",
    data=DATA,
    ti_config=TEXTUAL_INVERSION,
    lora_config=LORA,
    generate_config=GENERATE,
    config=CLASSIFIER,
    runs=RUNS.only("prepare_run_id", "generate_run_id"),
)
def train_classifier(data, ti_config, lora_config, generate_config, config, runs) -> None:
    """Train a classifier on real, synthetic or real+synthetic images; the epoch kept is chosen
    by --selection (validation macro-F1 by default; last; test, the reference code's rule) (MLflow
    run)."""
    from skindiff.tracking.train_classifier import run_train_classifier

    run_id = run_train_classifier(
        data,
        config,
        ti_config,
        lora_config,
        generate_config,
        runs.prepare_run_id,
        runs.generate_run_id,
    )
    typer.echo(f"train_classifier run {run_id}: metrics, predictions/test.csv and model logged")


@stage_command(
    "synthetic_quality",
    data=DATA,
    ti_config=TEXTUAL_INVERSION,
    lora_config=LORA,
    generate_config=GENERATE,
    classifier=CLASSIFIER,
    config=QUALITY,
    runs=RUNS.only("prepare_run_id", "generate_run_id"),
)
def synthetic_quality(data, ti_config, lora_config, generate_config, classifier, config, runs):
    """Score a generate run's images against the scenario's real dark-skinned images outside
    its test split: Fréchet distance, KID, precision, recall, density, coverage, and how many
    copy a training image other than their source (MLflow run)."""
    from skindiff.tracking.synthetic_quality import run_synthetic_quality

    run_id = run_synthetic_quality(
        data,
        ti_config,
        lora_config,
        generate_config,
        classifier,
        config,
        runs.prepare_run_id,
        runs.generate_run_id,
    )
    typer.echo(f"synthetic_quality run {run_id}: metrics and quality/ logged")


@stage_command("evaluate", config=EVALUATE)
def evaluate(config) -> None:
    """Evaluate a logged classifier (runs:/<id>/model or models:/...) on a split manifest or
    on a metadata CSV + image folder, logging the same metrics as training (MLflow run)."""
    from skindiff.tracking.evaluate import run_evaluate

    run_id = run_evaluate(config)
    typer.echo(f"evaluate run {run_id}: metrics and predictions/{config.name}.csv logged")


@stage_command("main", configs=MAIN_STUDY, plan=STUDY, dry=DRY_RUN)
def main(configs, plan, dry) -> None:
    """Run the paper's whole study (meant for a GPU, the real data and SD 2.1 base; `demo` is
    the same on a CPU in minutes): for each scenario and seed a parent MLflow run with
    prepare, textual_inversion, lora, generate and one train_classifier per arch x train type
    as child runs; finished runs with the same inputs are re-used. With --shard k/n, this
    worker runs its share of the pairs (one worker per GPU or machine, one tracking server);
    the default, auto, is the task's share in a SLURM job array and every pair elsewhere.
    With --dry-run, prints what it would run and re-use, and what that costs."""
    _run_study(configs, plan, dry)


@stage_command("demo", configs=DEMO_STUDY, plan=DEMO_PLAN, dry=DRY_RUN)
def demo(configs, plan, dry) -> None:
    """The study on the embedded default in minutes on a CPU: `main` with the demo's settings
    (the demo dataset, the built-in `tiny` model, scenarios i, ii and iii with seed 0, fewer
    steps, a small CNN at 64 px). Every option of `main` can still be given. Then `skindiff
    report` writes its tables and figures."""
    _run_study(configs, plan, dry)


def _echo_plan(plan, dry) -> None:
    from skindiff.tracking.dry_run import render_plan

    typer.echo(render_plan(plan, dry.throughput_tflops))


def _run_study(configs, plan, dry) -> None:
    from skindiff.tracking.pipeline import plan_main, run_main

    if dry.dry_run:
        _echo_plan(plan_main(plan, configs), dry)
        return

    for (scenario, seed), ids in run_main(plan, configs).items():
        typer.echo(f"scenario {scenario}, seed {seed}: run {ids.parent}")
        for (arch, train_type), run_id in ids.classifiers.items():
            typer.echo(f"  {arch:<9} {train_type:<9} train_classifier run {run_id}")


@stage_command("ablation", configs=ABLATION_STUDY, plan=ABLATION, dry=DRY_RUN)
def ablation(configs, plan, dry) -> None:
    """Table 5: scenario i, all six generation modes, a classifier (VGG-16 by default) on each
    mode's synthetic images only, tested on the light and the dark flexible subsets; logs
    ablation.csv. Finished stage runs are re-used."""
    from skindiff.tracking.ablation import plan_ablation, run_ablation

    if dry.dry_run:
        _echo_plan(plan_ablation(plan, configs), dry)
        return
    run_id = run_ablation(plan, configs)
    typer.echo(f"ablation run {run_id}: ablation.csv logged")


@stage_command("report", config=REPORT)
def report(config) -> None:
    """Rebuild the paper's Tables 2-5 (mean ± std over seeds, beside the published numbers)
    and plots from an experiment's finished main and ablation runs; written to output_dir and
    logged as a report run's artifacts."""
    from skindiff.tracking.report import run_report

    run_id = run_report(config)
    typer.echo(f"report run {run_id}: written to {config.output_dir}/report.md")


@stage_command("tune", configs=TUNE_STUDY, config=TUNE, dry=DRY_RUN)
def tune(configs, config, dry) -> None:
    """Optuna study of the generator's hyperparameters on scenario i (objective: macro-F1 of a
    classifier trained on synthetic images only, on scenario i's test split with the default
    --exclude-test-of ii,iii, else on validation); run it on several processes or machines
    with one storage to share the study. Ends by freezing the best trial's params
    (frozen_params.yaml) and registering its generator (MLflow run per worker and trial).
    With --seeds, one study per seed, each on that seed's data (frozen_params_by_seed.yaml)."""
    from skindiff.tracking.tune import plan_tune, run_tune, run_tune_seeds

    if dry.dry_run:
        _echo_plan(plan_tune(configs, config), dry)
        return
    if not config.seeds:
        _echo_tune_result(run_tune(configs, config), config.registered_model, "")
        return
    call = run_tune_seeds(configs, config)
    typer.echo(f"tune run {call.run_id}: seeds {as_text(config.seeds)}, one study each")
    for result in call.by_seed.values():
        _echo_tune_result(result, config.registered_model, f"seed {result.seed}: ")
    typer.echo(f"frozen params by seed: {call.frozen_params_uri}")


def _echo_tune_result(result, registered_model: str | None, label: str) -> None:
    typer.echo(
        f"{label}tune run {result.run_id}: best trial {result.best_trial}, "
        f"{result.objective} {result.best_value:.4f}"
    )
    for name, value in result.frozen_params.items():
        typer.echo(f"  {name} = {value}")
    indent = "  " if label else ""  # under its seed's line
    typer.echo(f"{indent}frozen params: {result.frozen_params_uri}")
    if result.registered_version:
        alias = ", alias champion" if result.champion else ""
        version = f"{registered_model} version {result.registered_version}{alias}"
        typer.echo(f"{indent}generator: {version}")


@stage_command("download", config=DOWNLOAD)
def download(config) -> None:
    """Fetch the images of a Fitzpatrick17k-format CSV (md5hash, url) into --image-dir as
    <md5hash>.jpg: politely (a few connections, a per-host rate limit, retries with backoff),
    keeping only files that decode as images, resuming where an earlier call stopped; logs
    download_report.csv and the counts (MLflow run). Then run prepare with --skip-missing true."""
    from skindiff.tracking.download import run_download

    run_id, summary = run_download(config)
    typer.echo(f"download run {run_id}: {summary.line()}; download_report.csv logged")


@app.command("demo-data")
def demo_data(
    output: Annotated[Path, typer.Argument(help="New folder to write (must not exist).")],
    seed: Annotated[int, typer.Option(help="Seed of the drawing; same seed, same files.")] = 0,
) -> None:
    """Write the embedded demo dataset (Fitzpatrick17k-format CSV + JPEGs) to a folder."""
    from skindiff.data.demo import write_demo_dataset

    demo = write_demo_dataset(output, seed=seed)
    typer.echo(f"metadata: {demo.metadata_csv}\nimages:   {demo.image_dir}")


@stage_command("pretrain-base", config=PRETRAIN, target=PRETRAIN_TARGET)
def pretrain_base(config, target) -> None:
    """Pretrain the `tiny` architecture on the procedural skin corpus (all six skin types,
    generic marks, none of the study's conditions) and save it as a diffusers folder, for
    any stage's --base-model. The built-in `tiny` was made by this with the defaults."""
    from skindiff.diffusion.pretrain import pretrain_base_model

    typer.echo(f"pretrained base model: {pretrain_base_model(config, Path(target.output_dir))}")


MLPROJECT_HEADER = """\
# Generated by `skindiff mlproject > MLproject` from the CLI; tests check it is current.
# Plain `mlflow run .` makes python_env.yaml's virtualenv (once; it needs pyenv), `--env-manager uv`
# makes it with uv (`pip install uv`), `--env-manager local` uses the Python it is started from
# (after `pip install -e .`). With conda: `conda env create -f conda.yaml`, `conda activate
# skindiff`, then `--env-manager local` (conda cannot make a python_env).
"""
# MLproject parameter type of each Python type; the rest (text, choices, lists) are strings.
MLPROJECT_TYPES = {int: "int", float: "float"}


def render_mlproject() -> str:
    """The MLproject file: one entry point per stage command, its options as parameters."""
    lines = [MLPROJECT_HEADER + "name: skindiff\npython_env: python_env.yaml\n\nentry_points:"]
    for name in ENTRY_POINTS:
        options = COMMAND_OPTIONS[name]
        lines.append(f"  {name}:\n    parameters:")
        for option in options:
            kind = MLPROJECT_TYPES.get(option.kind, "string")
            default = json.dumps(as_text(option.default))
            lines.append(f"      {option.name}: {{type: {kind}, default: {default}}}")
        flags = [f"--{option.name.replace('_', '-')} {{{option.name}}}" for option in options]
        lines.append(f"    command: >-\n      python entrypoints/{name}.py")
        lines += [f"      {flag}" for flag in flags]
        lines.append("")
    return "\n".join(lines)


@app.command("mlproject", hidden=True)
def mlproject() -> None:
    """Print the MLproject file made from the stage commands."""
    typer.echo(render_mlproject(), nl=False)


def run_entry_point(script: str) -> None:
    """Body of `entrypoints/<stage>.py`: runs the command named like the script."""
    run([Path(script).stem, *sys.argv[1:]])


class Stopped(BaseException):
    """SIGTERM or SIGINT, raised in the command's main thread. Not an Exception, so that no
    `except Exception` on the way swallows it; not a KeyboardInterrupt, which click would turn
    into "Aborted!"."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.at_ms = int(time.time() * 1000)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """While the block runs, SIGTERM and SIGINT raise `Stopped`, so the `with` blocks that
    opened runs unwind; the handlers that were there before come back after it."""
    owner = os.getpid()

    def stop(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != owner:
            # A forked worker (a DataLoader's) inherits the handler: it just goes.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        for stop_signal in STOP_SIGNALS:
            # A second signal while the runs are being ended ends the process at once.
            signal.signal(stop_signal, signal.SIG_DFL)
        raise Stopped(signum)

    # A signal ignored by whoever started the command (a background job's SIGINT) stays so.
    previous = {
        stop_signal: signal.signal(stop_signal, stop)
        for stop_signal in STOP_SIGNALS
        if signal.getsignal(stop_signal) is not signal.SIG_IGN
    }
    try:
        yield
    finally:
        for stop_signal, handler in previous.items():
            signal.signal(stop_signal, handler)


def _stopped_message(stop: Stopped) -> str:
    """Ends KILLED the runs the signal stopped; says which."""
    if "mlflow" not in sys.modules:  # no run can be open before MLflow is loaded
        return f"stopped by {stop}"
    from skindiff.tracking.stage import end_stopped_runs

    ended = end_stopped_runs(stop.at_ms)
    return f"stopped by {stop}" + (f"; runs ended KILLED: {', '.join(ended)}" if ended else "")


def _tracking_server_error(err: Exception) -> str | None:
    """One line for the tracking server being unreachable (naming a file with the traceback of
    where the command met it) or refusing the user; else None."""
    if "mlflow" not in sys.modules:
        return None
    from skindiff.tracking.access import refused_access
    from skindiff.tracking.server import unreachable_server

    unreachable = unreachable_server(err)
    if unreachable is None:
        return refused_access(err)
    details = cache_dir() / "errors" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    try:
        details.parent.mkdir(parents=True, exist_ok=True)
        details.write_text("".join(traceback.format_exception(err)))
    except OSError:  # a read-only cache: the line is still the news
        return unreachable
    return f"{unreachable} (details: {details})"


class ConsoleFormatter(logging.Formatter):
    """Progress as plain lines (`[ii/seed-42] lora: done in 4 min 12 s, run ...`); what may
    need the user's attention with its level (`WARNING: ...`)."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"{record.levelname}: {message}"


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    sys.exit(code)


def run(argv: list[str] | None = None) -> None:
    """Runs the CLI. Errors end in one line on stderr, not a traceback: input errors and an
    unreachable tracking server with exit code 2; SIGTERM and SIGINT (Ctrl-C) end the runs the
    command has open KILLED and exit with 128 + the signal's number (143, 130), as a shell
    reports a process killed by it."""
    choose_thread_policy()  # before torch loads: the OpenMP runtime reads it once
    # A bar per artifact download (a thousand in the demo, each of a few files) buries the
    # stages' lines and training bars; a user may still turn them on.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    handler = logging.StreamHandler()
    handler.setFormatter(ConsoleFormatter())
    package_log = logging.getLogger("skindiff")
    package_log.addHandler(handler)
    package_log.setLevel(logging.INFO)
    try:
        try:
            with _stopped_by_signals():
                app(args=argv, prog_name="skindiff")
        except Stopped as stop:
            _fail(_stopped_message(stop), 128 + stop.signum)
    except Exception as err:
        # A SkindiffError too: "run ... not found" may be the server gone.
        message = _tracking_server_error(err)
        if message is None and not isinstance(err, SkindiffError):
            raise
        _fail(message or str(err), 2)
    finally:
        package_log.removeHandler(handler)
