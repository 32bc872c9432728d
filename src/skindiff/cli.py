"""`skindiff` command line: one command per stage (the MLproject entry points call these).

A stage's options are made from its config dataclasses, so a config field, its CLI option and
its MLflow param have one name: `TextualInversionConfig.learning_rate` is `--ti-learning-rate`
and `-P ti_learning_rate=...`. Booleans take a value (`--skip-missing true`) and tuples a
comma list (`--conditions "psoriasis,folliculitis"`), as MLflow params do.
"""

import inspect
import json
import logging
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import replace
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.main

from skindiff.classify.models import PAPER_ARCHS
from skindiff.classify.train import ClassifierConfig
from skindiff.data.fitzpatrick import PAPER_SEEDS
from skindiff.data.prepare import PrepareConfig
from skindiff.errors import SkindiffError
from skindiff.options import (
    CLASSIFIER,
    DATA,
    GENERATE,
    LORA,
    MODEL,
    TEXTUAL_INVERSION,
    OptionGroup,
    build_config,
    comma_list,
    int_list,
)

app = typer.Typer(
    help="Diffusion-based augmentation of under-represented skin types, tracked with MLflow.\n\n"
    "Every stage logs an MLflow run to MLFLOW_TRACKING_URI (default: ./mlflow.db). With no "
    "options, stages run on the embedded demo dataset and the built-in `tiny` model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

HELP = {
    "metadata_csv": "Fitzpatrick17k-format metadata CSV. Empty: the embedded demo dataset "
    "(evaluate: not used).",
    "image_dir": "Folder of the images (<md5hash>.jpg, or the CSV's `path` column relative to "
    "it). Empty: the embedded demo dataset (evaluate: not used).",
    "scenario": "i: train on light+dark; ii: light + the dark flexible subset; iii: light only.",
    "seed": "Repeat seed: picks the flexible subsets and seeds every stage.",
    "val_fraction": "Share of each (condition, skin group) of the training set held out for "
    "validation. 0 gives the paper's split sizes.",
    "conditions": "Comma list of the conditions (labels) to classify.",
    "light_fst": "Comma list of the majority (light) skin types.",
    "dark_fst": "Comma list of the minority (dark) skin types.",
    "flexible_per_condition": "Images per condition in each flexible subset.",
    "skip_missing": "true: drop rows whose image is missing or corrupt (listed in "
    "splits/dropped_images.csv) instead of stopping.",
    "base_model": "tiny (built-in, CPU-sized), sd21-random (full SD 2.1-base architecture, "
    "random weights), a local diffusers folder, or a hub id such as "
    "stabilityai/stable-diffusion-2-1-base.",
    "resolution": "Training and img2img resolution in pixels; 0 = the model's native size.",
    "mixed_precision": "auto (fp16 on a GPU, full on a CPU), no, fp16 or bf16.",
    "arch": "Classifier: vgg16, resnet18, vit_b_16 or tiny (a small CNN for CPU runs).",
    "weights": "imagenet (from the local torch cache, never downloaded), none, or a "
    "checkpoint file.",
    "finetune": "head: frozen backbone, new head (reference); full: train everything.",
    "train_type": "real, syn or real+syn: the images the classifier trains on.",
    "model_uri": "Classifier to evaluate: runs:/<run id>/model or models:/<name>@<alias>.",
    "manifest": "Split manifest CSV (columns md5hash, label, fitzpatrick_scale, path), a path "
    "or an artifact URI such as runs:/<prepare run>/splits/test.csv.",
    "name": "Prefix of the metric names (test -> test_accuracy, ...).",
    "batch_size": "Classifier: images per batch (evaluate: per inference batch).",
    "epochs": "Classifier: training epochs; the best is chosen on the validation split.",
    "learning_rate": "Classifier: Adam learning rate (StepLR divides it by 10 every epochs // 3).",
    "image_size": "Classifier: input crop in pixels (ViT-B-16 needs 224).",
    "ti_num_vectors": "Textual Inversion: embedding vectors per token.",
    "ti_initializer_word": "Textual Inversion: the word whose embedding starts every token.",
    "ti_max_train_steps": "Textual Inversion: optimizer steps (all conditions' tokens together).",
    "ti_train_batch_size": "Textual Inversion: images per micro-batch.",
    "ti_gradient_accumulation_steps": "Textual Inversion: micro-batches per optimizer step.",
    "ti_learning_rate": "Textual Inversion: AdamW learning rate before scaling.",
    "ti_scale_lr": "true: multiply the learning rate by batch x accumulation (reference).",
    "ti_weight_decay": "Textual Inversion: AdamW weight decay.",
    "ti_checkpoint_every": "Textual Inversion: steps between resumable checkpoints.",
    "lora_rank": "LoRA: rank of the adapter matrices.",
    "lora_alpha": "LoRA: scaling alpha (the update is scaled by alpha / rank).",
    "lora_target_modules": "LoRA: comma list of UNet attention modules to adapt.",
    "lora_learning_rate": "LoRA: AdamW learning rate.",
    "lora_max_train_steps": "LoRA: optimizer steps.",
    "lora_train_batch_size": "LoRA: images per micro-batch.",
    "lora_gradient_accumulation_steps": "LoRA: micro-batches per optimizer step.",
    "lora_weight_decay": "LoRA: AdamW weight decay.",
    "lora_max_grad_norm": "LoRA: gradient clipping norm (0 = none).",
    "lora_snr_gamma": "LoRA: Min-SNR loss weighting gamma (0 = off; 5 is common).",
    "lora_gradient_checkpointing": "true: trade compute for memory in the UNet.",
    "lora_checkpoint_every": "LoRA: steps between resumable checkpoints.",
    "mode": "pipeline/adapters: img2img/ti+lora (the paper's method), img2img/ti, "
    "img2img/lora, img2img/vanilla, txt2img/ti, txt2img/vanilla.",
    "num_per_image": "Synthetic images per training image.",
    "strength": "img2img: how far from the source image (0-1; 0.5 = half the steps).",
    "guidance_scale": "Classifier-free guidance scale.",
    "num_inference_steps": "Scheduler steps (img2img runs strength x this many).",
    "scheduler": "default (the model's own: PNDM for SD 2.1 base), pndm, ddim, dpm++, euler, "
    "euler-a.",
    "output_size": "Side of the saved synthetic images in pixels.",
    "generation_batch_size": "Images per pipeline call.",
    "scenarios": "Comma list of scenarios to run (i, ii, iii).",
    "seeds": "Comma list of repeat seeds (the paper's: 0,42,123,1111,1234).",
    "archs": "Comma list of classifier architectures (vgg16, resnet18, vit_b_16, tiny).",
    "train_types": "Comma list of classifier training sets: real, syn, real+syn.",
    "frozen_params": "Tuned settings to use unchanged: a tune run id, a frozen_params.yaml "
    "file, or a generator model URI (models:/skin-diff-generator@champion). Empty: the options "
    "as given.",
    "target_fst": "Comma list of skin types a light source image is moved to (one drawn per "
    "image); dark sources keep their own.",
    "experiment": "Experiment (name or id) whose finished main and ablation runs to report. "
    "Empty: the current one (MLFLOW_EXPERIMENT_ID / MLFLOW_EXPERIMENT_NAME, else Default).",
    "output_dir": "Folder for the tables, plots and report.md: new, empty, or an earlier report "
    "(only its files are replaced).",
    "n_trials": "Tune: trials this worker runs (every worker of a study adds its own).",
    "storage": "Tune: Optuna storage URL the workers share: sqlite:///optuna.db (a file in the "
    "working directory, workers on one machine) or an RDB URL such as "
    "postgresql://user:password@host/db for workers on several machines.",
    "study_name": "Tune: name of the Optuna study; workers with the same name and storage share "
    "it, and a later call continues it.",
    "registered_model": "Tune: registered model to add the best trial's generator to (alias "
    "champion moved when it beats the current one). Empty: do not register.",
    "search_space": "Tune: YAML file of option name -> {low, high[, log][, step]} or {choices}; "
    "it replaces the built-in space. Empty: the built-in space around the reference values.",
    "heartbeat_interval": "Tune: seconds between a running trial's heartbeats.",
    "grace_period": "Tune: seconds without a heartbeat after which a trial's worker counts as "
    "dead: the trial is failed and queued again.",
}


class Switch(StrEnum):
    true = "true"
    false = "false"


def _cli_value(kind: Any, value: Any) -> tuple[Any, Any]:
    """(annotation typer understands, default) for a config field type and default."""
    if kind is bool:
        return Switch, Switch(str(value).lower())
    if typing.get_origin(kind) is tuple:
        return str, ",".join(map(str, value))
    return kind, value


def _parameters(groups: Sequence[OptionGroup]) -> list[inspect.Parameter]:
    params: dict[str, inspect.Parameter] = {}
    for group in groups:
        for name, field_kind, field_default in group.option_fields():
            if name in params:
                continue
            kind, default = _cli_value(field_kind, field_default)
            option = typer.Option(help=HELP.get(name, ""), show_default=True)
            params[name] = inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=default,
                annotation=Annotated[kind, option],
            )
    return list(params.values())


def stage_command(name: str, groups: Sequence[OptionGroup], extra: Sequence = ()) -> Callable:
    """Registers `body(*configs, **extra_options)` as the command `name`, with one option per
    config field of `groups` plus the `extra` (name, annotation, default) options."""

    def register(body: Callable) -> Callable:
        params = _parameters(groups) + [
            inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=a)
            for n, a, d in extra
        ]
        extra_names = [n for n, _, _ in extra]

        def command(**options: Any) -> None:
            configs = [build_config(group, options) for group in groups]
            body(*configs, **{n: options[n] for n in extra_names})

        command.__signature__ = inspect.Signature(params)
        command.__doc__ = body.__doc__
        app.command(name)(command)
        return body

    return register


@stage_command("prepare", [DATA])
def prepare(data: PrepareConfig) -> None:
    """Validate the dataset and write one scenario's train/val/test manifests (MLflow run)."""
    from skindiff.tracking.prepare import run_prepare

    run_id = run_prepare(data)
    typer.echo(f"prepare run {run_id}: splits/train.csv, splits/val.csv, splits/test.csv logged")


def _run_id_option(name: str, stage: str, options: str) -> tuple:
    help_text = (
        f"Id of a finished {stage} run to use. Empty: find a finished {stage} run with the "
        f"same inputs and {options}, or run it first."
    )
    return name, Annotated[str, typer.Option(help=help_text)], ""


PREPARE_RUN = _run_id_option("prepare_run_id", "prepare", "data options")
TI_RUN = _run_id_option("ti_run_id", "textual_inversion", "ti_ options")
LORA_RUN = _run_id_option("lora_run_id", "lora", "lora_ options")
GENERATE_RUN = _run_id_option("generate_run_id", "generate", "generator options")


@stage_command("textual_inversion", [DATA, MODEL, TEXTUAL_INVERSION], extra=[PREPARE_RUN])
def textual_inversion(data, model, config, prepare_run_id: str) -> None:
    """Learn one Textual Inversion token per condition on the training split (MLflow run)."""
    from skindiff.tracking.textual_inversion import run_textual_inversion

    run_id = run_textual_inversion(data, config, prepare_run_id)
    typer.echo(f"textual_inversion run {run_id}: embeddings/*.safetensors logged")


@stage_command(
    "lora",
    [DATA, MODEL, TEXTUAL_INVERSION, LORA],
    extra=[
        PREPARE_RUN,
        TI_RUN,
        (
            "use_ti",
            Annotated[Switch, typer.Option(help="false: train without TI tokens (ablation).")],
            Switch.true,
        ),
    ],
)
def lora(data, model, ti_config, config, prepare_run_id: str, ti_run_id: str, use_ti) -> None:
    """Fine-tune the UNet with LoRA, captions naming the TI tokens and skin type (MLflow run)."""
    from skindiff.tracking.lora import run_lora

    with_ti = use_ti == Switch.true
    run_id = run_lora(
        data, config, prepare_run_id, ti_run_id if with_ti else "", ti_config if with_ti else None
    )
    typer.echo(f"lora run {run_id}: lora/pytorch_lora_weights.safetensors logged")


GENERATOR_URI = (
    "generator_uri",
    Annotated[
        str,
        typer.Option(
            help="A registered generator model (models:/skin-diff-generator@champion, "
            "runs:/<run id>/generator) to generate with: its embeddings, LoRA weights, base "
            "model, resolution, mode, strength, guidance scale, steps and scheduler replace "
            "those options, and no textual_inversion or lora run is used. Empty: the runs."
        ),
    ],
    "",
)


@stage_command(
    "generate",
    [DATA, MODEL, TEXTUAL_INVERSION, LORA, GENERATE],
    extra=[PREPARE_RUN, TI_RUN, LORA_RUN, GENERATOR_URI],
)
def generate(
    data,
    model,
    ti_config,
    lora_config,
    config,
    prepare_run_id: str,
    ti_run_id: str,
    lora_run_id: str,
    generator_uri: str,
) -> None:
    """Generate synthetic variants of every training image (img2img by default; MLflow run)."""
    from skindiff.tracking.generate import run_generate

    run_id = run_generate(
        data,
        ti_config,
        lora_config,
        config,
        prepare_run_id,
        ti_run_id,
        lora_run_id,
        generator_uri,
    )
    typer.echo(f"generate run {run_id}: synthetic/manifest.csv and images logged")


@stage_command(
    "train_classifier",
    [DATA, MODEL, TEXTUAL_INVERSION, LORA, GENERATE, CLASSIFIER],
    extra=[PREPARE_RUN, GENERATE_RUN],
)
def train_classifier(
    data,
    model,
    ti_config,
    lora_config,
    generate_config,
    config,
    prepare_run_id: str,
    generate_run_id: str,
) -> None:
    """Train a classifier on real, synthetic or real+synthetic images; model selection on the
    validation split, the test split scored once (MLflow run)."""
    from skindiff.tracking.train_classifier import run_train_classifier

    run_id = run_train_classifier(
        data, config, ti_config, lora_config, generate_config, prepare_run_id, generate_run_id
    )
    typer.echo(f"train_classifier run {run_id}: metrics, predictions/test.csv and model logged")


def _evaluate_group() -> OptionGroup:
    from skindiff.tracking.evaluate import EvaluateConfig

    return OptionGroup(EvaluateConfig)


@stage_command("evaluate", [_evaluate_group()])
def evaluate(config) -> None:
    """Evaluate a logged classifier (runs:/<id>/model or models:/...) on a split manifest or
    on a metadata CSV + image folder, logging the same metrics as training (MLflow run)."""
    from skindiff.tracking.evaluate import run_evaluate

    run_id = run_evaluate(config)
    typer.echo(f"evaluate run {run_id}: metrics and predictions/{config.name}.csv logged")


@stage_command(
    "main",
    [
        OptionGroup(PrepareConfig, omit=("scenario", "seed")),
        MODEL,
        TEXTUAL_INVERSION,
        LORA,
        GENERATE,
        OptionGroup(ClassifierConfig, shared=("seed",), omit=("arch", "train_type")),
    ],
    extra=[
        ("scenarios", Annotated[str, typer.Option(help=HELP["scenarios"])], "i,ii,iii"),
        (
            "seeds",
            Annotated[str, typer.Option(help=HELP["seeds"])],
            ",".join(map(str, PAPER_SEEDS)),
        ),
        ("archs", Annotated[str, typer.Option(help=HELP["archs"])], ",".join(PAPER_ARCHS)),
        (
            "train_types",
            Annotated[str, typer.Option(help=HELP["train_types"])],
            "real,syn,real+syn",
        ),
        ("frozen_params", Annotated[str, typer.Option(help=HELP["frozen_params"])], ""),
    ],
)
def main(
    data,
    model,
    ti_config,
    lora_config,
    generate_config,
    classifier_config,
    scenarios: str,
    seeds: str,
    archs: str,
    train_types: str,
    frozen_params: str,
) -> None:
    """Run the whole study: for each scenario and seed a parent MLflow run with prepare,
    textual_inversion, lora, generate and one train_classifier per arch x train type as
    child runs; finished runs with the same inputs are re-used."""
    from skindiff.tracking.pipeline import StudyConfigs, run_main

    runs = run_main(
        comma_list(scenarios),
        int_list(seeds, "seeds"),
        StudyConfigs(data, ti_config, lora_config, generate_config, classifier_config),
        comma_list(archs),
        comma_list(train_types),
        frozen_params,
    )
    for (scenario, seed), ids in runs.items():
        typer.echo(f"scenario {scenario}, seed {seed}: run {ids.parent}")
        for (arch, train_type), run_id in ids.classifiers.items():
            typer.echo(f"  {arch:<9} {train_type:<9} train_classifier run {run_id}")


def _ablation_groups() -> list[OptionGroup]:
    from skindiff.tracking.ablation import CLASSIFIER_OPTIONS, GENERATE_OPTIONS

    scenario_i = OptionGroup(PrepareConfig, omit=("scenario", "seed"))
    return [scenario_i, MODEL, TEXTUAL_INVERSION, LORA, GENERATE_OPTIONS, CLASSIFIER_OPTIONS]


@stage_command(
    "ablation",
    _ablation_groups(),
    extra=[("seeds", Annotated[str, typer.Option(help=HELP["seeds"])], "0")],
)
def ablation(data, model, ti_config, lora_config, generate_config, classifier_config, seeds):
    """Table 5: scenario i, all six generation modes, a classifier (VGG-16 by default) on each
    mode's synthetic images only, tested on the light and the dark flexible subsets; logs
    ablation.csv. Finished stage runs are re-used."""
    from skindiff.tracking.ablation import run_ablation

    seed_list = int_list(seeds, "seeds")
    if not seed_list:
        raise SkindiffError(f"seeds must be a comma list of integers, got {seeds!r}")
    run_id = run_ablation(
        seed_list, data, ti_config, lora_config, generate_config, classifier_config
    )
    typer.echo(f"ablation run {run_id}: ablation.csv logged")


@stage_command(
    "report",
    [],
    extra=[
        ("experiment", Annotated[str, typer.Option(help=HELP["experiment"])], ""),
        ("output_dir", Annotated[str, typer.Option(help=HELP["output_dir"])], "report"),
    ],
)
def report(experiment: str, output_dir: str) -> None:
    """Rebuild the paper's Tables 2-5 (mean ± std over seeds, beside the published numbers)
    and plots from an experiment's finished main and ablation runs; written to output_dir and
    logged as a report run's artifacts."""
    from skindiff.tracking.report import run_report

    run_id = run_report(experiment, output_dir)
    typer.echo(f"report run {run_id}: written to {output_dir}/report.md")


def _tune_groups() -> list[OptionGroup]:
    from skindiff.tracking.tune import TUNE

    scenario_i = replace(DATA, omit=("scenario",))
    syn_classifier = replace(CLASSIFIER, omit=("train_type",))
    return [scenario_i, MODEL, TEXTUAL_INVERSION, LORA, GENERATE, syn_classifier, TUNE]


@stage_command("tune", _tune_groups())
def tune(data, model, ti_config, lora_config, generate_config, classifier_config, config) -> None:
    """Optuna study of the generator's hyperparameters on scenario i (objective: validation
    macro-F1 of a classifier trained on synthetic images only); run it on several processes
    or machines with one storage to share the study. Ends by freezing the best trial's params
    (frozen_params.yaml) and registering its generator (MLflow run per worker and trial)."""
    from skindiff.tracking.pipeline import StudyConfigs
    from skindiff.tracking.tune import run_tune

    configs = StudyConfigs(data, ti_config, lora_config, generate_config, classifier_config)
    result = run_tune(configs, config)
    typer.echo(
        f"tune run {result.run_id}: best trial {result.best_trial}, "
        f"val_f1_macro {result.best_value:.4f}"
    )
    for name, value in result.frozen_params.items():
        typer.echo(f"  {name} = {value}")
    typer.echo(f"frozen params: {result.frozen_params_uri}")
    if result.registered_version:
        alias = ", alias champion" if result.champion else ""
        typer.echo(
            f"generator: {config.registered_model} version {result.registered_version}{alias}"
        )


# Stage commands that are MLproject entry points, in the order MLproject lists them.
ENTRY_POINTS = (
    "main",
    "tune",
    "prepare",
    "textual_inversion",
    "lora",
    "generate",
    "train_classifier",
    "evaluate",
    "ablation",
    "report",
)


@app.command("demo-data")
def demo_data(
    output: Annotated[Path, typer.Argument(help="New folder to write (must not exist).")],
    seed: Annotated[int, typer.Option(help="Seed of the drawing; same seed, same files.")] = 0,
) -> None:
    """Write the embedded demo dataset (Fitzpatrick17k-format CSV + JPEGs) to a folder."""
    from skindiff.data.demo import write_demo_dataset

    demo = write_demo_dataset(output, seed=seed)
    typer.echo(f"metadata: {demo.metadata_csv}\nimages:   {demo.image_dir}")


MLPROJECT_HEADER = """\
# Generated by `skindiff mlproject > MLproject` from the CLI; tests check it is current.
# `mlflow run . --env-manager local` uses the Python it is started from (after `pip install -e .`);
# with conda installed, plain `mlflow run .` builds conda.yaml's environment instead.
"""


def render_mlproject() -> str:
    """The MLproject file: one entry point per stage command, its options as parameters."""
    commands = typer.main.get_command(app).commands
    lines = [MLPROJECT_HEADER + "name: skindiff\nconda_env: conda.yaml\n\nentry_points:"]
    for name in ENTRY_POINTS:
        params = [p for p in commands[name].params if p.name != "help"]
        lines.append(f"  {name}:\n    parameters:")
        for p in params:
            kind = "float" if isinstance(p.default, float) else "string"
            default = json.dumps(str(getattr(p.default, "value", p.default)))
            lines.append(f"      {p.name}: {{type: {kind}, default: {default}}}")
        flags = [f"--{p.name.replace('_', '-')} {{{p.name}}}" for p in params]
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
