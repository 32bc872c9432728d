"""The `synthetic_quality` stage: how good one generate run's images are, as measures of the
images themselves (`skindiff.quality`), logged per run so the MLflow UI compares them: against
the scenario's real dark-skinned images outside its test split (`quality.reference`), beside
the real light-skinned sources the images were made from, and their memorization of the
training images.
"""

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from torch import nn

from skindiff.classify.config import Arch, ClassifierConfig, TrainType, Weights
from skindiff.classify.models import imagenet_file, require_imagenet_files
from skindiff.data.config import PrepareConfig
from skindiff.data.image_signatures import pixel_thumbnails
from skindiff.diffusion.config import GenerateConfig
from skindiff.diffusion.lora import LoraConfig
from skindiff.diffusion.textual_inversion import TextualInversionConfig
from skindiff.errors import SkindiffError
from skindiff.options import DATA, QUALITY
from skindiff.quality.config import IMAGENET_FEATURES, QualityConfig, QualityFeatures
from skindiff.quality.features import (
    INCEPTION_SIZE,
    Penultimate,
    cached_features,
    fid_inception,
    imagenet_backbone,
    require_inception_file,
)
from skindiff.quality.reference import REFERENCE_SCENARIO, reference_images
from skindiff.quality.score import (
    ALL,
    FeatureSet,
    memorization,
    nearest_pairs_figure,
    quality_table,
)
from skindiff.tracking.classifier_model import load_classifier
from skindiff.tracking.dry_run import WorkCost
from skindiff.tracking.generate import given_or_generated, load_synthetic, synthetic_count
from skindiff.tracking.names import (
    CLASSIFIER_MODEL,
    MEMORIZATION_SPACE_PARAM,
    QUALITY_METRICS,
    QUALITY_NEAREST_PAIRS,
    QUALITY_PER_IMAGE,
    Stage,
)
from skindiff.tracking.prepare import ensure_prepare, split_inputs
from skindiff.tracking.runs import load_split
from skindiff.tracking.stage import StageCall, StageInputs, run_stage, upstream_key
from skindiff.tracking.train_classifier import run_train_classifier

IMAGENET_SIZE = 224


def chosen_features(config: QualityConfig) -> QualityFeatures:
    """`auto`: the first ImageNet backbone whose weights file is present, else classifier."""
    if config.quality_features != QualityFeatures.AUTO:
        return config.quality_features
    present = [f for f in IMAGENET_FEATURES if imagenet_file(Arch(str(f))).is_file()]
    return present[0] if present else QualityFeatures.CLASSIFIER


def reference_rows(data: PrepareConfig, prepare_run_id: str) -> pd.DataFrame:
    """The scenario's reference images (`reference_images`), from its prepare run or, for
    scenario iii, from scenario ii's of the same seed (found or run); checked against the
    scenario's test split."""
    source = REFERENCE_SCENARIO[data.scenario]
    run = prepare_run_id
    if source != data.scenario:
        run = ensure_prepare(replace(data, scenario=source))
    rows = reference_images(load_split(run, "train"), load_split(run, "val"))
    test = set(load_split(prepare_run_id, "test")["md5hash"])
    leaked = sorted(set(rows["md5hash"]) & test)
    if leaked:  # by construction never; a changed split rule must not go unnoticed
        raise SkindiffError(
            f"the reference set holds {len(leaked)} test image(s), e.g. {leaked[0]}"
        )
    return rows


@dataclass(frozen=True)
class FeatureNetwork:
    """The network the measures compare images in: its cache name (unique to its weights),
    its input size, the classifier run it is (where it is one), and how to load it, which
    happens only when an image is not in the cache (a re-used run loads nothing)."""

    name: str
    image_size: int
    load: Callable[[], nn.Module]
    classifier_run_id: str | None = None

    def features(self, rows: pd.DataFrame, batch_size: int = 64) -> np.ndarray:
        return cached_features(self.name, self.load, rows, self.image_size, batch_size)


def feature_network(
    features: QualityFeatures,
    data: PrepareConfig,
    ti_config: TextualInversionConfig,
    lora_config: LoraConfig,
    generate_config: GenerateConfig,
    classifier: ClassifierConfig,
    prepare_run_id: str,
) -> FeatureNetwork:
    """The network of `features` (not auto): for `classifier`, the scenario's real classifier
    with the `classifier` settings, found or trained."""
    if features == QualityFeatures.CLASSIFIER:
        real = replace(classifier, train_type=TrainType.REAL)
        run_id = run_train_classifier(
            data, real, ti_config, lora_config, generate_config, prepare_run_id, reuse=True
        )

        def load() -> nn.Module:
            return Penultimate(load_classifier(f"runs:/{run_id}/{CLASSIFIER_MODEL}"))

        return FeatureNetwork(f"classifier-{upstream_key(run_id)}", real.image_size, load, run_id)
    # a missing weights file stops the stage here, before its run opens
    if features == QualityFeatures.INCEPTION:
        require_inception_file()
        return FeatureNetwork("inception-fid", INCEPTION_SIZE, fid_inception)
    arch = Arch(str(features))
    require_imagenet_files([arch], Weights.IMAGENET)
    return FeatureNetwork(
        f"{features}-imagenet", IMAGENET_SIZE, lambda: Penultimate(imagenet_backbone(arch))
    )


def _quality_cost(inputs: StageInputs) -> WorkCost:
    """The images embedded: the synthetic ones, the reference set and the training images."""
    synthetic = synthetic_count(inputs.upstream[Stage.GENERATE])
    return WorkCost(images=synthetic + sum(map(len, inputs.splits.values())))


def run_synthetic_quality(
    data: PrepareConfig,
    ti_config: TextualInversionConfig,
    lora_config: LoraConfig,
    generate_config: GenerateConfig,
    classifier: ClassifierConfig,
    config: QualityConfig,
    prepare_run_id: str | None = None,
    generate_run_id: str | None = None,
    *,
    reuse: bool = False,
) -> str:
    """Scores a generate run's images (found or run from the options where not given);
    returns the run id (with `reuse`, of a finished run with the same key)."""
    features = chosen_features(config)
    call = StageCall(
        Stage.SYNTHETIC_QUALITY,
        f"{data.scenario}/seed-{data.seed}/synthetic_quality",
        QUALITY.values(replace(config, quality_features=features)),
        DATA.values(data),
        f"{features} features",
        cost=_quality_cost,
    )
    network = {}

    def resolve() -> StageInputs:
        inputs = split_inputs(data, prepare_run_id, ("train", "val"))
        inputs.upstream[Stage.GENERATE] = given_or_generated(
            generate_run_id, data, ti_config, lora_config, generate_config, inputs.prepare_run_id
        )
        reference = reference_rows(data, inputs.prepare_run_id)
        inputs.splits["reference"] = reference
        found = feature_network(
            features,
            data,
            ti_config,
            lora_config,
            generate_config,
            classifier,
            inputs.prepare_run_id,
        )
        network["found"] = found
        inputs.upstream[Stage.TRAIN_CLASSIFIER] = found.classifier_run_id
        inputs.digests["features"] = found.name
        return inputs

    def work(inputs: StageInputs, key: str) -> None:
        chosen = network["found"]

        def embed(rows: pd.DataFrame) -> np.ndarray:
            return chosen.features(rows, config.quality_batch_size)

        training = pd.concat([inputs.splits["train"], inputs.splits["val"]], ignore_index=True)
        with tempfile.TemporaryDirectory() as tmp:
            synthetic = load_synthetic(inputs.upstream[Stage.GENERATE], Path(tmp))
            sources = training[
                (training["group"] == "light") & training["md5hash"].isin(synthetic["md5hash"])
            ]
            reference = inputs.splits["reference"]
            sets = {"synthetic": synthetic, "light_sources": sources}
            embedded = {name: embed(rows) for name, rows in sets.items()}
            table = quality_table(
                FeatureSet(embed(reference), reference["label"].to_numpy()),
                {n: FeatureSet(embedded[n], sets[n]["label"].to_numpy()) for n in sets},
                config.nearest_k,
                seed=data.seed,
            )
            row_of = {md5: row for row, md5 in enumerate(training["md5hash"])}
            source_rows = np.array([row_of.get(m, -1) for m in synthetic["md5hash"]])
            # a classifier's features make a condition's images alike: copies are looked for
            # in the pixels instead
            if features == QualityFeatures.CLASSIFIER:
                space = "pixels"
                copies, originals = (pixel_thumbnails(r["path"]) for r in (synthetic, training))
            else:
                space, copies, originals = str(features), embedded["synthetic"], embed(training)
            copied = memorization(copies, originals, source_rows, config.memorization_threshold)
            figure = nearest_pairs_figure(
                synthetic["path"].tolist(), training["path"].tolist(), copied
            )
        _log(table, copied, synthetic, training, figure, str(features), space)

    return run_stage(call, resolve, work, reuse=reuse)


def _log(table, copied, synthetic, training, figure, features: str, space: str) -> None:
    """Metrics `<measure>_<features>` (the synthetic set over all conditions; the light
    sources' as `<measure>_<features>_light_sources`), the memorization ones as
    `memorized_share_<space>` (param memorization_space), and the quality/ artifacts."""
    metrics = {}
    for row in table[table["condition"] == ALL].itertuples():
        suffix = "" if row.set == "synthetic" else f"_{row.set}"
        for measure in ("fd", "kid", "kid_std", "precision", "recall", "density", "coverage"):
            metrics[f"{measure}_{features}{suffix}"] = float(getattr(row, measure))
    per_image = copied.per_image
    mlflow.log_param(MEMORIZATION_SPACE_PARAM, space)
    metrics[f"memorized_share_{space}"] = copied.share
    metrics[f"nearest_similarity_median_{space}"] = float(per_image["nearest_similarity"].median())
    metrics[f"source_similarity_median_{space}"] = float(per_image["source_similarity"].median())
    mlflow.log_metrics(metrics)
    images = synthetic[["md5hash", "index", "label", "path"]].assign(
        path=[Path(p).name for p in synthetic["path"]],
        nearest_md5hash=training["md5hash"].to_numpy()[per_image["nearest_index"]],
        nearest_similarity=per_image["nearest_similarity"],
        source_similarity=per_image["source_similarity"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        for artifact, frame in (
            (QUALITY_METRICS, table.assign(features=features)),
            (QUALITY_PER_IMAGE, images),
        ):
            path = Path(tmp) / Path(artifact).name
            frame.to_csv(path, index=False)
            mlflow.log_artifact(str(path), str(Path(artifact).parent))
    mlflow.log_figure(figure, QUALITY_NEAREST_PAIRS)
