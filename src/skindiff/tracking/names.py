"""Every name skindiff gives things in MLflow: stages (entry points), tags, artifacts, models.

A run is found, compared and re-used by these names, so each is spelled here and nowhere else.
"""

from enum import StrEnum

from skindiff.core.labels import slug
from skindiff.diffusion.adapters import LORA_WEIGHTS_FILE


class Stage(StrEnum):
    """The MLproject entry points; every stage run carries its name as ENTRY_POINT_TAG."""

    MAIN = "main"
    TUNE = "tune"
    PREPARE = "prepare"
    TEXTUAL_INVERSION = "textual_inversion"
    LORA = "lora"
    GENERATE = "generate"
    TRAIN_CLASSIFIER = "train_classifier"
    EVALUATE = "evaluate"
    SYNTHETIC_QUALITY = "synthetic_quality"
    ABLATION = "ablation"
    REPORT = "report"
    DOWNLOAD = "download"


# MLflow's own tags.
ENTRY_POINT_TAG = "mlflow.project.entryPoint"
PARENT_RUN_TAG = "mlflow.parentRunId"

# Tags of every stage run.
VERSION_TAG = "skindiff.version"
RUN_KEY_TAG = "skindiff.run_key"


def upstream_tag(stage: Stage) -> str:
    """Tag naming the run of `stage` a run was made from: `skindiff.prepare_run_id`, ..."""
    return f"skindiff.{stage}_run_id"


# prepare
DATASET_DIGEST_TAG = "skindiff.dataset_digest"
DATASET_TAGS = ("skindiff.metadata_csv", "skindiff.image_dir", "skindiff.demo_data")
# on prepare runs: what was done about near-duplicates (report, drop, off) and the rule used
NEAR_DUPLICATES_TAG = "skindiff.near_duplicates"
NEAR_DUPLICATE_RULE_TAG = "skindiff.near_duplicate_rule"


def split_digest_tag(split: str) -> str:
    """Tag holding the content digest of one split of a prepare run."""
    return f"skindiff.digest.{split}"


def token_tag(condition: str) -> str:
    """Tag of a textual_inversion run naming a condition's token: `skindiff.token.<slug>`."""
    return f"skindiff.token.{slug(condition)}"


# generate with a generator model
GENERATOR_URI_TAG = "skindiff.generator_uri"
GENERATOR_SETTING_TAG_PREFIX = "skindiff.generator."

# train_classifier: the classifier's `selection`, so a report can mark scores selected on test
SELECTION_TAG = "skindiff.selection"
KEPT_EPOCH_TAG = "skindiff.kept_epoch"  # the kept epoch's number, or "initial" (selection test)

# main
SCENARIO_TAG = "skindiff.scenario"
FROZEN_PARAMS_TAG = "skindiff.frozen_params"
FROZEN_PARAM_PREFIX = "frozen."  # params of the frozen values a main run used
# Param of a main run: the k/n its `shard` param (`auto` from a SLURM array) made it.
SHARD_RESOLVED_PARAM = "shard_resolved"
# Param of a pair run (and, per seed, of its main run): the data seed its frozen settings were
# tuned on, "unknown" where the source does not say (a YAML file).
FROZEN_PARAMS_SEED_PARAM = "frozen_params_seed"
# Metric of a pair run with frozen settings: its test images that scored the tuning objective.
SCORED_BY_TUNING_METRIC = "n_test_images_scored_by_tuning"
# a main pair run's synthetic_quality run (the report's quality section reads it)
QUALITY_RUN_TAG = "skindiff.synthetic_quality_run"
TUNING_OVERLAP_FILE = "tuning_overlap.csv"  # the main run's table of that count per pair

# tune
STUDY_TAG = "skindiff.study_name"
STORAGE_TAG = "skindiff.storage"
TRIAL_TAG = "skindiff.trial_number"
TUNED_TAG = "skindiff.tuned"
BEST_VALUE_TAG = "skindiff.best_value"
BEST_TRIAL_TAG = "skindiff.best_trial"
FROZEN_TAG_PREFIX = "skindiff.frozen."
TUNE_SEEDS_TAG = "skindiff.tune_seeds"  # a tune call with seeds: the data seeds, "0,42"

# report
REPORT_EXPERIMENT_TAG = "skindiff.report_experiment_id"
PAIRED_METRIC_PREFIX = "paired"  # the report run's metrics of its paired differences

# Artifacts.
SPLITS_DIR = "splits"


def split_artifact(split: str) -> str:
    return f"{SPLITS_DIR}/{split}.csv"


EMBEDDINGS_DIR = "embeddings"
LORA_WEIGHTS_ARTIFACT = f"lora/{LORA_WEIGHTS_FILE}"
VALIDATION_DIR = "validation"
SYNTHETIC_DIR = "synthetic"
SYNTHETIC_MANIFEST = "manifest.csv"
SYNTHETIC_GRID = "grid.png"
SKIN_TONE_FIGURE = "skin_tone.png"  # ITA histograms of real and synthetic images
DOWNLOAD_REPORT = "download_report.csv"  # one row per image: status, reason, hashes
PREDICTIONS_DIR = "predictions"
QUALITY_DIR = "quality"  # a synthetic_quality run's artifacts:
QUALITY_METRICS = f"{QUALITY_DIR}/metrics.csv"  # the measures, per set and condition
QUALITY_PER_IMAGE = f"{QUALITY_DIR}/per_image.csv"  # each synthetic image's nearest similarities
QUALITY_NEAREST_PAIRS = f"{QUALITY_DIR}/nearest_pairs.png"
# what memorization compared: the features, or `pixels` where those are a classifier's
MEMORIZATION_SPACE_PARAM = "memorization_space"
TEST_PREDICTIONS = f"{PREDICTIONS_DIR}/test.csv"  # a classifier run's, on its test split


def confusion_figure(prefix: str) -> str:
    return f"figures/confusion_{prefix}.png"


RESULTS_FILE = "results.csv"
ABLATION_FILE = "ablation.csv"
FROZEN_PARAMS_FILE = "frozen_params.yaml"
FROZEN_PARAMS_BY_SEED_FILE = "frozen_params_by_seed.yaml"  # seed -> {option: value}

# Models.
CLASSIFIER_MODEL = "model"
GENERATOR_MODEL = "generator"
CHAMPION_ALIAS = "champion"
# Tag of a registered generator version: the data seed (scenario i of that seed) it was tuned on.
TUNE_SEED_VERSION_TAG = "tune_seed"

# tune: the protocol a tune run scored trials by ("paper", "exclude-test-of-ii,iii").
TUNE_PROTOCOL_TAG = "skindiff.tune_protocol"

# Every stage run: the process at work on it (pid, and host with its PID namespace), so that a
# rerun tells the run of a killed process from one still at work; on a run a rerun ended so,
# the run that took over its key.
PID_TAG = "skindiff.pid"
HOST_TAG = "skindiff.host"
SUPERSEDED_BY_TAG = "skindiff.superseded_by"
