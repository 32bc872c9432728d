"""Logs the `generate` stage: synthetic images, their manifest, a real/synthetic grid.

Adapters come from the given run ids, else from finished runs with the same key, else they are
trained first (as child runs of the generate run); or a generator model (see registry.py)
brings the adapters and the tuned settings, and no upstream run is used.
"""

import tempfile
from dataclasses import replace
from pathlib import Path

import mlflow
import pandas as pd

from skindiff.core.distributed import run_shared
from skindiff.core.settings import as_text
from skindiff.data.config import PrepareConfig
from skindiff.diffusion.config import GenerateConfig, LoraConfig, TextualInversionConfig
from skindiff.diffusion.costs import unet_evaluations_per_image, unet_flops
from skindiff.diffusion.figures import real_synthetic_pairs, skin_tone_histograms
from skindiff.diffusion.generate import IMAGE_DIR, generate_synthetic
from skindiff.diffusion.skin_tone_check import skin_tone_metrics, with_source_itas
from skindiff.options import DATA, GENERATE, LORA, TEXTUAL_INVERSION
from skindiff.plans import UpstreamRuns
from skindiff.tracking.dry_run import WorkCost, active_plan, is_planned
from skindiff.tracking.lora import run_lora
from skindiff.tracking.names import (
    EMBEDDINGS_DIR,
    GENERATOR_SETTING_TAG_PREFIX,
    GENERATOR_URI_TAG,
    LORA_WEIGHTS_ARTIFACT,
    SKIN_TONE_FIGURE,
    SYNTHETIC_DIR,
    SYNTHETIC_GRID,
    SYNTHETIC_MANIFEST,
    Stage,
)
from skindiff.tracking.registry import MODEL_SETTINGS, fetch_generator
from skindiff.tracking.runs import download_run_dir, fetch_upstream
from skindiff.tracking.stage import (
    StageCall,
    StageInputs,
    require_stage_run,
    run_stage,
    upstream_of,
    work_dir,
)
from skindiff.tracking.textual_inversion import generator_inputs, run_textual_inversion


def run_generate(
    data: PrepareConfig,
    ti_config: TextualInversionConfig,
    lora_config: LoraConfig,
    config: GenerateConfig,
    prepare_run_id: str | None = None,
    ti_run_id: str | None = None,
    lora_run_id: str | None = None,
    generator_uri: str | None = None,
    *,
    reuse: bool = False,
) -> str:
    """Generates `num_per_image` variants of every training image; returns the run id (with
    `reuse`, of a finished run with the same key where there is one).

    With `generator_uri` (a generator model: models:/skin-diff-generator@champion, runs:/...),
    the adapters and MODEL_SETTINGS come from the model, no textual_inversion or lora run is
    used, and the settings the model fixed are logged as tags `skindiff.generator.<name>`."""
    if generator_uri:
        # The one rule for the combination: a model brings its own adapters.
        UpstreamRuns(ti_run_id=ti_run_id, lora_run_id=lora_run_id, generator_uri=generator_uri)
        return _generate_with_model(data, config, prepare_run_id, generator_uri)
    context = DATA.values(data) | TEXTUAL_INVERSION.values(ti_config) | LORA.values(lora_config)
    context |= {"ti_run_id": as_text(ti_run_id), "lora_run_id": as_text(lora_run_id)}
    call = StageCall(
        Stage.GENERATE,
        f"{data.scenario}/seed-{data.seed}/{Stage.GENERATE}/{config.mode}",
        GENERATE.values(config),
        context,
        f"{config.num_per_image} images per training image",
        cost=lambda inputs: generation_cost(config, inputs),
    )

    def resolve() -> StageInputs:
        inputs = generator_inputs(data, prepare_run_id, config.base_model)
        ti = lora = None
        if config.uses_ti:
            ti = ti_run_id or run_textual_inversion(
                data, ti_config, inputs.prepare_run_id, reuse=True
            )
        if config.uses_lora:
            lora = lora_run_id or run_lora(data, lora_config, inputs.prepare_run_id, ti, reuse=True)
        inputs.upstream |= {Stage.TEXTUAL_INVERSION: ti, Stage.LORA: lora}
        return inputs

    def work(inputs: StageInputs, key: str) -> None:
        ti, lora = inputs.upstream[Stage.TEXTUAL_INVERSION], inputs.upstream[Stage.LORA]
        with tempfile.TemporaryDirectory() as tmp:
            embeddings = lora_weights = None
            if ti:
                embeddings = fetch_upstream(
                    ti, Stage.TEXTUAL_INVERSION, EMBEDDINGS_DIR, config.base_model, Path(tmp)
                )
            if lora:
                lora_weights = fetch_upstream(
                    lora, Stage.LORA, LORA_WEIGHTS_ARTIFACT, config.base_model, Path(tmp)
                )
            _generate_and_log(config, inputs, key, embeddings, lora_weights, None)

    return run_stage(call, resolve, work, reuse=reuse)


def generation_cost(config: GenerateConfig, inputs: StageInputs) -> WorkCost:
    """`num_per_image` images of every training image, each its UNet evaluations."""
    images = len(inputs.splits["train"]) * config.num_per_image
    evaluations = images * unet_evaluations_per_image(config)
    flops = unet_flops(config.base_model, config.resolution, training=False)
    return WorkCost(images=images, unet_evaluations=evaluations, flops=evaluations * flops)


def _generate_with_model(
    data: PrepareConfig, config: GenerateConfig, prepare_run_id: str | None, generator_uri: str
) -> str:
    """The generate command with a generator model: its settings and weights are keyed by
    content; the options it fixes are not the run's params but tags."""
    own = {k: v for k, v in GENERATE.values(config).items() if k not in MODEL_SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        generator = fetch_generator(generator_uri, Path(tmp))
        fixed = {name: getattr(generator.config, name) for name in MODEL_SETTINGS}
        config = replace(config, **fixed)
        call = StageCall(
            Stage.GENERATE,
            f"{data.scenario}/seed-{data.seed}/{Stage.GENERATE}/generator-model",
            own,
            DATA.values(data) | {"generator_uri": generator_uri},
            f"{config.num_per_image} images per training image",
        )

        def resolve() -> StageInputs:
            inputs = generator_inputs(data, prepare_run_id, config.base_model)
            inputs.digests |= generator.weights_digest()
            inputs.digests |= {f"generator.{k}": as_text(v) for k, v in fixed.items()}
            return inputs

        def work(inputs: StageInputs, key: str) -> None:
            tags = {GENERATOR_SETTING_TAG_PREFIX + k: as_text(v) for k, v in fixed.items()}
            mlflow.set_tags(tags)
            _generate_and_log(
                config, inputs, key, generator.embeddings_dir, generator.lora_file, generator_uri
            )

        return run_stage(call, resolve, work, reuse=False)


def _generate_and_log(
    config: GenerateConfig,
    inputs: StageInputs,
    key: str,
    embeddings: Path | None,
    lora_weights: Path | None,
    generator_uri: str | None,
) -> None:
    mlflow.set_tag(GENERATOR_URI_TAG, as_text(generator_uri))
    out_dir = work_dir(Stage.GENERATE, key)
    manifest = run_shared(
        generate_synthetic, config, inputs.splits["train"], out_dir, embeddings, lora_weights
    )
    manifest = manifest.assign(
        prepare_run_id=inputs.prepare_run_id,
        ti_run_id=as_text(inputs.upstream.get(Stage.TEXTUAL_INVERSION)),
        lora_run_id=as_text(inputs.upstream.get(Stage.LORA)),
        generator_uri=as_text(generator_uri),
    )
    sources = with_source_itas(inputs.splits["train"])
    with tempfile.TemporaryDirectory() as tmp:
        manifest.to_csv(Path(tmp) / SYNTHETIC_MANIFEST, index=False)
        real_synthetic_pairs(manifest, out_dir).save(Path(tmp) / SYNTHETIC_GRID)
        skin_tone_histograms(sources, manifest).savefig(Path(tmp) / SKIN_TONE_FIGURE, dpi=100)
        mlflow.log_artifacts(tmp, SYNTHETIC_DIR)
    mlflow.log_metrics(skin_tone_metrics(sources, manifest))
    # The manifest's paths are relative to the work folder: the artifacts keep its layout.
    mlflow.log_artifacts(str(out_dir / IMAGE_DIR), f"{SYNTHETIC_DIR}/{IMAGE_DIR}")
    mlflow.log_metric("n_synthetic", len(manifest))
    for fst, n in manifest.groupby("fitzpatrick_scale").size().items():
        mlflow.log_metric(f"n_synthetic_fst{fst}", n)


def ensure_generator_chain(
    data: PrepareConfig,
    ti_config: TextualInversionConfig,
    lora_config: LoraConfig,
    config: GenerateConfig,
    prepare_run_id: str,
) -> tuple[str | None, str | None, str]:
    """(textual_inversion, lora, generate) run ids for `config.mode`, each found or run; None
    for an adapter the mode does not use."""
    generate = run_generate(data, ti_config, lora_config, config, prepare_run_id, reuse=True)
    ti, lora = (upstream_of(generate, s) for s in (Stage.TEXTUAL_INVERSION, Stage.LORA))
    return ti, lora, generate


def given_or_generated(
    generate_run_id: str | None,
    data: PrepareConfig,
    ti_config: TextualInversionConfig,
    lora_config: LoraConfig,
    config: GenerateConfig,
    prepare_run_id: str,
) -> str:
    """The generate run a stage reads: the one named, else one found or run from the options."""
    if generate_run_id:
        return generate_run_id
    return ensure_generator_chain(data, ti_config, lora_config, config, prepare_run_id)[2]


def synthetic_count(generate_run_id: str) -> int:
    """How many images a generate run made (or, in a dry run, will make)."""
    if is_planned(generate_run_id):
        return active_plan().stage_of(generate_run_id).cost.images
    return int(mlflow.get_run(generate_run_id).data.metrics["n_synthetic"])


def load_synthetic(generate_run_id: str, dst: Path) -> pd.DataFrame:
    """A generate run's manifest with its images downloaded under `dst` (absolute paths)."""
    require_stage_run(generate_run_id, Stage.GENERATE)
    folder = download_run_dir(generate_run_id, SYNTHETIC_DIR, dst)
    manifest = pd.read_csv(folder / SYNTHETIC_MANIFEST, keep_default_na=False)
    return manifest.assign(path=[str(folder / p) for p in manifest["path"]])
