"""Plans of the tracked commands beyond the science stages' own configs: which runs to chain,
what `main`, `ablation`, `tune`, `evaluate` and `report` cover.

Like the stage configs, these import neither MLflow nor torch, so `skindiff --help` is fast.
"""

import itertools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from skindiff.classify.config import ARCH_CHOICES, PAPER_ARCHS, Arch, TrainType
from skindiff.core.settings import Settings, check_seed, setting
from skindiff.data.config import Scenario
from skindiff.data.fitzpatrick import DARK_FST, LIGHT_FST, PAPER_SEEDS
from skindiff.errors import require

# The registered model `tune` adds its best generator to, unless told another.
DEFAULT_REGISTERED_MODEL = "skin-diff-generator"


def _run_id_help(stage: str, options: str) -> str:
    return (
        f"Id of a finished {stage} run to use. Empty: find a finished {stage} run with the "
        f"same inputs and {options}, or run it first."
    )


DEFAULT_EXPERIMENT = "skindiff"


@dataclass(frozen=True)
class TrackingConfig(Settings):
    """Where a command's runs go."""

    experiment_name: str = setting(
        DEFAULT_EXPERIMENT,
        "MLflow experiment the runs go to, created if new. Under `mlflow run`, the experiment "
        "of the run it opened (give `mlflow run --experiment-name skindiff`).",
        env="MLFLOW_EXPERIMENT_NAME",
    )

    def check(self) -> None:
        require(bool(self.experiment_name.strip()), "experiment_name is empty")


@dataclass(frozen=True)
class UpstreamRuns(Settings):
    """The runs a stage is made from, where the user names them (None: found or run)."""

    prepare_run_id: str | None = setting(None, _run_id_help("prepare", "data options"))
    ti_run_id: str | None = setting(None, _run_id_help("textual_inversion", "ti_ options"))
    lora_run_id: str | None = setting(None, _run_id_help("lora", "lora_ options"))
    generate_run_id: str | None = setting(None, _run_id_help("generate", "generator options"))
    generator_uri: str | None = setting(
        None,
        "A registered generator model (models:/skin-diff-generator@champion, runs:/<run id>/"
        "generator) to generate with: its embeddings, LoRA weights, base model, resolution, "
        "mode, strength, guidance scale, steps and scheduler replace those options, and no "
        "textual_inversion or lora run is used. Empty: the runs.",
    )
    use_ti: bool = setting(True, "false: train without TI tokens (ablation).")

    def check(self) -> None:
        require(
            not (self.generator_uri and (self.ti_run_id or self.lora_run_id)),
            "give generator_uri or ti_run_id/lora_run_id, not both",
        )


@dataclass(frozen=True)
class StudyPlan(Settings):
    """What `main` runs: every scenario x seed (of its shard), and per pair every arch x train
    type."""

    scenarios: tuple[Scenario, ...] = setting(
        tuple(Scenario), "Comma list of scenarios to run (i, ii, iii)."
    )
    seeds: tuple[int, ...] = setting(
        PAPER_SEEDS, "Comma list of repeat seeds (the paper's: 0,42,123,1111,1234)."
    )
    archs: tuple[Arch, ...] = setting(
        PAPER_ARCHS,
        "Comma list of classifier architectures (vgg16, resnet18, vit_b_16, tiny, "
        "timm:<model name> such as timm:convnext_tiny).",
    )
    train_types: tuple[TrainType, ...] = setting(
        tuple(TrainType), "Comma list of classifier training sets: real, syn, real+syn."
    )
    frozen_params: str | None = setting(
        None,
        "Tuned settings to use unchanged: a tune run id, a frozen_params.yaml file, or a "
        "generator model URI (models:/skin-diff-generator@champion). Empty: the options as "
        "given. A tune run made with --seeds gives each seed the settings tuned on it.",
    )
    frozen_fallback_seed: int | None = setting(
        None,
        "With frozen_params from a tune run made with --seeds: the tuned seed whose settings "
        "the seeds without their own use. Empty: such a seed is refused.",
    )
    shard: str = setting(
        "auto",
        "This worker's share of the pairs, k/n: worker k of n runs the pairs at positions k-1, "
        "k-1+n, k-1+2n, ... (from 0) of scenarios x seeds in that order (i/seed-0, i/seed-42, "
        "..., ii/seed-0, ...), so n workers started with 1/n ... n/n against one tracking "
        "server run every pair once. 1/1: every pair. auto: in a SLURM job array (sbatch "
        "--array=0-14) task k of its n tasks, k = SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN "
        "+ 1 and n = SLURM_ARRAY_TASK_COUNT (the array's ids must be contiguous); outside one, "
        "1/1. The main run's shard_resolved param says which k/n it was.",
    )
    light_test: bool = setting(
        True,
        "Also score every classifier on its seed's light flexible subset (8 light-skinned "
        "images per condition, in no scenario's training set), an evaluate run named light, "
        "for the report's light-minus-dark gap. false: the dark test split only, as the paper.",
    )
    synthetic_quality: bool = setting(
        True,
        "Also score each pair's synthetic images (a synthetic_quality run: Fréchet distance, "
        "KID, precision, recall, density, coverage, memorization) against the scenario's real "
        "dark-skinned images outside its test split. false: skip it.",
    )

    def check(self) -> None:
        for name, choices in (
            ("scenarios", "i, ii, iii"),
            ("archs", ARCH_CHOICES),
            ("train_types", ", ".join(TrainType)),
        ):
            require(bool(getattr(self, name)), f"{name} must be a comma list of {choices}, got ''")
        _check_seeds(self.seeds)
        if self.frozen_fallback_seed is not None:
            check_seed("frozen_fallback_seed", self.frozen_fallback_seed)
        _parse_shard(self.shard)

    def pairs(self) -> list[tuple[Scenario, int]]:
        """The (scenario, seed) pairs this worker runs (see `shard`)."""
        k, n = _parse_shard(self.shard)
        return list(itertools.product(self.scenarios, self.seeds))[k - 1 :: n]

    def resolved_shard(self) -> str:
        """`shard` as the k/n this worker is (`auto` resolved)."""
        k, n = _parse_shard(self.shard)
        return f"{k}/{n}"


def _parse_shard(text: str) -> tuple[int, int]:
    """(k, n) of a shard `k/n`, worker k of n, or of `auto`; anything else is refused naming
    the option."""
    if text == "auto":
        return slurm_array_shard(os.environ)
    match = re.fullmatch(r"([0-9]+)/([0-9]+)", text)
    k, n = (int(match[1]), int(match[2])) if match else (0, 0)
    require(1 <= k <= n, f"shard must be auto or k/n with 1 <= k <= n, got {text!r}")
    return k, n


# What sbatch --array sets in each task's environment; ID, COUNT and MIN place the task, MAX
# and STEP tell whether the array's ids are contiguous (`--array=0-14:2`, `--array=1,4,5` are
# not: their tasks would not cover 1/n ... n/n).
SLURM_ARRAY_VARIABLES = (
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_COUNT",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_MAX",
    "SLURM_ARRAY_TASK_STEP",
)


def slurm_array_shard(environ: Mapping[str, str]) -> tuple[int, int]:
    """(k, n) of the SLURM array task whose variables `environ` holds, (1, 1) where it holds
    none; inconsistent or unusable values are refused in one line naming the variables."""
    # Empty counts as unset: `VAR= cmd` is how a shell clears one for a command.
    given = {name: environ[name] for name in SLURM_ARRAY_VARIABLES if environ.get(name)}
    if not given:
        return 1, 1
    where = "shard auto: " + " ".join(f"{name}={value}" for name, value in given.items())
    missing = [name for name in SLURM_ARRAY_VARIABLES[:3] if name not in given]
    require(not missing, f"{where} without {', '.join(missing)}; give --shard k/n")
    values = {}
    for name, value in given.items():
        integer = value.isascii() and value.isdigit()
        require(integer, f"{where}: {name} must be an integer, got {value!r}")
        values[name.removeprefix("SLURM_ARRAY_TASK_")] = int(value)
    task, count, first = values["ID"], values["COUNT"], values["MIN"]
    require(count >= 1, f"{where}: SLURM_ARRAY_TASK_COUNT must be at least 1")
    last = first + count - 1
    contiguous = values.get("STEP", 1) == 1 and values.get("MAX", last) == last
    require(
        contiguous,
        f"{where}: the array's task ids are not contiguous (a step or a list such as "
        "--array=0-14:2); give a range such as --array=0-14, or --shard k/n",
    )
    require(
        first <= task <= last,
        f"{where}: SLURM_ARRAY_TASK_ID is not within SLURM_ARRAY_TASK_MIN .. "
        "SLURM_ARRAY_TASK_MIN + SLURM_ARRAY_TASK_COUNT - 1",
    )
    return task - first + 1, count


def _check_seeds(seeds: tuple[int, ...]) -> None:
    require(bool(seeds), "seeds must be a comma list of integers, got ''")
    for seed in seeds:
        check_seed("seeds", seed)


@dataclass(frozen=True)
class DryRunConfig(Settings):
    """Whether a command only prints its plan; options of the command line, not of MLflow."""

    dry_run: bool = setting(
        False,
        "Print the plan and run nothing: each stage in order, `re-use <run id>` where a "
        "finished run has its inputs, else `run` with its cost (training steps and images, UNet "
        "evaluations and their FLOPs counted from the base model's config, classifier "
        "image-epochs), and the totals. Nothing is logged.",
    )
    throughput_tflops: float | None = setting(
        None,
        "With dry_run: the TFLOP/s your device sustains on the base model's UNet (the "
        "generation benchmark prints it), to project the plan's hours. Empty: no projection.",
    )

    def check(self) -> None:
        require(
            self.throughput_tflops is None or self.throughput_tflops > 0,
            f"throughput_tflops must be positive, got {self.throughput_tflops}",
        )


@dataclass(frozen=True)
class AblationPlan(Settings):
    """The seeds of the ablation (Table 5)."""

    seeds: tuple[int, ...] = setting((0,), "Comma list of repeat seeds to run the ablation for.")

    def check(self) -> None:
        _check_seeds(self.seeds)


# Fewer replicates put a 95% interval's ends on the 2nd or 3rd most extreme replicate.
MIN_BOOTSTRAP_REPLICATES = 100


@dataclass(frozen=True)
class ReportConfig(Settings):
    experiment: str | None = setting(
        None,
        "Experiment (name or id) whose finished main and ablation runs to report. Empty: the "
        "one the report run goes to (experiment_name).",
    )
    output_dir: str = setting(
        "report",
        "Folder for the tables, plots and report.md: new, empty, or an earlier report (only "
        "its files are replaced).",
    )
    bootstrap_replicates: int = setting(
        2000,
        "Bootstrap replicates of each paired difference's interval, and resamples of its "
        "randomization test (at least 100).",
    )
    confidence: float = setting(
        0.95, "Confidence level of the paired differences' intervals, between 0 and 1."
    )

    def check(self) -> None:
        require(
            self.bootstrap_replicates >= MIN_BOOTSTRAP_REPLICATES,
            f"bootstrap_replicates must be at least {MIN_BOOTSTRAP_REPLICATES}, "
            f"got {self.bootstrap_replicates}",
        )
        require(
            0 < self.confidence < 1, f"confidence must lie between 0 and 1, got {self.confidence}"
        )


@dataclass(frozen=True)
class EvaluateConfig(Settings):
    """What to evaluate, on which images. Give `manifest`, or `metadata_csv` + `image_dir`."""

    model_uri: str | None = setting(
        None, "Classifier to evaluate: runs:/<run id>/model or models:/<name>@<alias>."
    )
    manifest: str | None = setting(
        None,
        "Split manifest CSV (columns md5hash, label, fitzpatrick_scale, path), a path or an "
        "artifact URI such as runs:/<prepare run>/splits/test.csv.",
    )
    metadata_csv: str | None = setting(
        None, "Fitzpatrick17k-format metadata CSV to evaluate on (with image_dir)."
    )
    image_dir: str | None = setting(None, "Folder of the images of metadata_csv.")
    conditions: tuple[str, ...] = setting((), "Conditions to keep. Empty: the model's classes.")
    light_fst: tuple[int, ...] = setting(
        LIGHT_FST, "Comma list of the majority (light) skin types."
    )
    dark_fst: tuple[int, ...] = setting(DARK_FST, "Comma list of the minority (dark) skin types.")
    name: str = setting("test", "Prefix of the metric names (test -> test_accuracy, ...).")
    batch_size: int = setting(64, "Images per inference batch.")

    def check(self) -> None:
        require(
            self.model_uri is not None,
            "model_uri is empty: give runs:/<run id>/model or models:/...",
        )
        require(
            (self.manifest is None) != (self.metadata_csv is None and self.image_dir is None),
            "give either manifest, or metadata_csv and image_dir",
        )
        require(
            self.manifest is not None or (self.metadata_csv is not None and self.image_dir),
            "metadata_csv and image_dir must be given together",
        )
        require(self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}")


@dataclass(frozen=True)
class TuneConfig(Settings):
    """Settings of a `tune` worker; every worker of a study uses the same storage and name."""

    n_trials: int = setting(
        10, "Tune: trials this worker runs (every worker of a study adds its own), per seed."
    )
    seeds: tuple[int, ...] = setting(
        (),
        "Tune: comma list of data seeds to tune each on its own: one study per seed "
        "(<study_name>-seed-<seed>), on scenario i of that seed without that seed's test images "
        "of the exclude_test_of scenarios, each freezing and registering its own settings; "
        "`main --frozen-params <this run>` gives each seed its own. Empty: one study on --seed.",
    )
    storage: str = setting(
        "sqlite:///optuna.db",
        "Tune: Optuna storage URL the workers share: sqlite:///optuna.db (a file in the "
        "working directory, workers on one machine) or an RDB URL such as "
        "postgresql://user:password@host/db for workers on several machines.",
    )
    study_name: str = setting(
        "skindiff-tune",
        "Tune: name of the Optuna study; workers with the same name and storage share it, and "
        "a later call continues it.",
    )
    registered_model: str | None = setting(
        DEFAULT_REGISTERED_MODEL,
        "Tune: registered model to add the best trial's generator to (alias champion moved "
        "when it beats the current one). Empty: do not register.",
    )
    search_space: str | None = setting(
        None,
        "Tune: YAML file of option name -> {low, high[, log][, step]} or {choices}; it "
        "replaces the built-in space. Empty: the built-in space around the reference values.",
    )
    heartbeat_interval: int = setting(60, "Tune: seconds between a running trial's heartbeats.")
    grace_period: int = setting(
        180,
        "Tune: seconds without a heartbeat after which a trial's worker counts as dead: the "
        "trial is failed and queued again.",
    )

    def check(self) -> None:
        for name in ("n_trials", "heartbeat_interval", "grace_period"):
            value = getattr(self, name)
            require(value >= 1, f"{name} must be at least 1, got {value}")
        for seed in self.seeds:
            check_seed("seeds", seed)
        require(
            len(set(self.seeds)) == len(self.seeds),
            f"seeds: listed twice in {','.join(map(str, self.seeds))}",
        )
        require(
            self.grace_period > self.heartbeat_interval,
            f"grace_period ({self.grace_period} s) must exceed heartbeat_interval "
            f"({self.heartbeat_interval} s), or live trials would be failed",
        )
