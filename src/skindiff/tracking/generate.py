"""Logs the `generate` stage: synthetic images, their manifest, a real/synthetic grid.

Upstream runs come from the given run ids, else from a finished run with the same key, else
they are run first (as child runs of the generate run); or a generator model (see registry.py)
brings the adapters and the tuned settings, and no upstream run is used.
"""

import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import mlflow
import pandas as pd

from skindiff.data.prepare import PrepareConfig, content_digest
from skindiff.diffusion.figures import real_synthetic_pairs
from skindiff.diffusion.generate import GenerateConfig, generate_synthetic
from skindiff.diffusion.lora import LoraConfig
from skindiff.diffusion.textual_inversion import TextualInversionConfig
from skindiff.errors import SkindiffError
from skindiff.options import DATA, GENERATE, LORA, TEXTUAL_INVERSION, as_text, option_values
from skindiff.tracking.lora import TI_RUN_TAG, WEIGHTS_ARTIFACT, ensure_lora, upstream_key
from skindiff.tracking.prepare import ensure_prepare, load_split
from skindiff.tracking.registry import fetch_generator
from skindiff.tracking.reuse import RUN_KEY_TAG, find_finished_run, run_key, work_dir
from skindiff.tracking.runs import (
    download_run_dir,
    fetch_upstream,
    require_stage_run,
    stage_run,
)
from skindiff.tracking.textual_inversion import (
    PREPARE_RUN_TAG,
    ensure_textual_inversion,
    model_fingerprint,
)

STAGE = "generate"
LORA_RUN_TAG = "skindiff.lora_run_id"
GENERATOR_TAG = "skindiff.generator"
GENERATOR_URI_TAG = f"{GENERATOR_TAG}_uri"
# The settings a generator model fixes; with one, the command gives only the others.
MODEL_SETTINGS = (
    "base_model",
    "mode",
    "strength",
    "guidance_scale",
    "num_inference_steps",
    "scheduler",
    "resolution",
)


def generate_key(config: GenerateConfig, train: pd.DataFrame, adapters: Mapping) -> str:
    """Same source images, settings, base model, adapters and code: same images."""
    inputs = {
        "train": content_digest(train),
        "base_model": model_fingerprint(config.base_model),
    } | dict(adapters)
    return run_key(STAGE, option_values(GENERATE, config), inputs)


def upstream_keys(ti_run_id: str, lora_run_id: str) -> dict[str, str]:
    """The adapters of upstream runs, as a run key sees them."""
    return {"textual_inversion": upstream_key(ti_run_id), "lora": upstream_key(lora_run_id)}


def adapter_runs(
    data: PrepareConfig,
    ti_config: TextualInversionConfig,
    lora_config: LoraConfig,
    config: GenerateConfig,
    prepare_run_id: str,
    ti_run_id: str = "",
    lora_run_id: str = "",
) -> tuple[str, str]:
    """(textual_inversion, lora) run ids `config.mode` uses: the given ones, else found or run
    (nested under the active run); "" for an adapter the mode does not use."""
    if not config.uses_ti:
        ti_run_id = ""
    elif not ti_run_id:
        ti_run_id = ensure_textual_inversion(data, ti_config, prepare_run_id)
    if not config.uses_lora:
        lora_run_id = ""
    elif not lora_run_id:
        lora_run_id = ensure_lora(data, lora_config, prepare_run_id, ti_run_id)
    return ti_run_id, lora_run_id


def run_generate(
    data: PrepareConfig,
    ti_config: TextualInversionConfig,
    lora_config: LoraConfig,
    config: GenerateConfig,
    prepare_run_id: str = "",
    ti_run_id: str = "",
    lora_run_id: str = "",
    generator_uri: str = "",
) -> str:
    """Generates `num_per_image` variants of every training image; returns the run id.

    With `generator_uri` (a generator model: models:/skin-diff-generator@champion, runs:/...),
    the adapters and MODEL_SETTINGS come from the model, no textual_inversion or lora run is
    used, and the settings the model fixed are logged as tags `skindiff.generator.<name>`."""
    if generator_uri and (ti_run_id or lora_run_id):
        raise SkindiffError("give generator_uri or ti_run_id/lora_run_id, not both")
    if generator_uri:
        own = {k: v for k, v in option_values(GENERATE, config).items() if k not in MODEL_SETTINGS}
        params = option_values(DATA, data) | own | {"generator_uri": generator_uri}
    else:
        params = (
            option_values(DATA, data)
            | option_values(TEXTUAL_INVERSION, ti_config)
            | option_values(LORA, lora_config)
            | option_values(GENERATE, config)
            | {"ti_run_id": ti_run_id, "lora_run_id": lora_run_id}
        )
    source = "generator-model" if generator_uri else config.mode
    run_name = f"{data.scenario}/seed-{data.seed}/{STAGE}/{source}"
    with stage_run(STAGE, run_name, params) as run, tempfile.TemporaryDirectory() as tmp:
        prepare_run_id = prepare_run_id or ensure_prepare(data)
        if generator_uri:
            generator = fetch_generator(generator_uri, Path(tmp))
            model_settings = {name: getattr(generator.config, name) for name in MODEL_SETTINGS}
            config = replace(config, **model_settings)
            mlflow.set_tags({f"{GENERATOR_TAG}.{k}": as_text(v) for k, v in model_settings.items()})
            adapters = {"generator": generator.weights_digest()}
            embeddings, lora_weights = generator.embeddings_dir, generator.lora_file
        else:
            ti_run_id, lora_run_id = adapter_runs(
                data, ti_config, lora_config, config, prepare_run_id, ti_run_id, lora_run_id
            )
            adapters = upstream_keys(ti_run_id, lora_run_id)
            embeddings, lora_weights = _fetch_adapters(
                ti_run_id, lora_run_id, config.base_model, Path(tmp)
            )
        train = load_split(prepare_run_id, "train")
        key = generate_key(config, train, adapters)
        mlflow.set_tags(
            {
                RUN_KEY_TAG: key,
                PREPARE_RUN_TAG: prepare_run_id,
                TI_RUN_TAG: ti_run_id,
                LORA_RUN_TAG: lora_run_id,
                GENERATOR_URI_TAG: generator_uri,
            }
        )
        out_dir = work_dir(STAGE, key)
        manifest = generate_synthetic(config, train, out_dir, embeddings, lora_weights)
        manifest = manifest.assign(
            prepare_run_id=prepare_run_id,
            ti_run_id=ti_run_id,
            lora_run_id=lora_run_id,
            generator_uri=generator_uri,
        )
        _log_synthetic(manifest, out_dir)
    return run.info.run_id


def _fetch_adapters(
    ti_run_id: str, lora_run_id: str, base_model: str, dst: Path
) -> tuple[Path | None, Path | None]:
    """(embeddings folder, LoRA weights) of the upstream runs; None for an absent one."""
    embeddings = lora_weights = None
    if ti_run_id:
        embeddings = fetch_upstream(ti_run_id, "textual_inversion", "embeddings", base_model, dst)
    if lora_run_id:
        lora_weights = fetch_upstream(lora_run_id, "lora", WEIGHTS_ARTIFACT, base_model, dst)
    return embeddings, lora_weights


def _log_synthetic(manifest: pd.DataFrame, out_dir: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        manifest.to_csv(Path(tmp) / "manifest.csv", index=False)
        real_synthetic_pairs(manifest, out_dir).save(Path(tmp) / "grid.png")
        mlflow.log_artifacts(tmp, "synthetic")
    mlflow.log_artifacts(str(out_dir / "images"), "synthetic/images")
    mlflow.log_metric("n_synthetic", len(manifest))
    for fst, n in manifest.groupby("fitzpatrick_scale").size().items():
        mlflow.log_metric(f"n_synthetic_fst{fst}", n)


def ensure_generate(
    data: PrepareConfig,
    ti_config: TextualInversionConfig,
    lora_config: LoraConfig,
    config: GenerateConfig,
    prepare_run_id: str,
    ti_run_id: str,
    lora_run_id: str,
) -> str:
    """A finished generate run with the same key, or a new one (upstream runs resolved)."""
    train = load_split(prepare_run_id, "train")
    found = find_finished_run(generate_key(config, train, upstream_keys(ti_run_id, lora_run_id)))
    if found:
        return found.info.run_id
    return run_generate(
        data, ti_config, lora_config, config, prepare_run_id, ti_run_id, lora_run_id
    )


def ensure_generator_chain(
    data: PrepareConfig,
    ti_config: TextualInversionConfig,
    lora_config: LoraConfig,
    config: GenerateConfig,
    prepare_run_id: str,
) -> tuple[str, str, str]:
    """(textual_inversion, lora, generate) run ids for `config.mode`, each found or run."""
    ti, lora = adapter_runs(data, ti_config, lora_config, config, prepare_run_id)
    generate = ensure_generate(data, ti_config, lora_config, config, prepare_run_id, ti, lora)
    return ti, lora, generate


def load_synthetic(generate_run_id: str, dst: Path) -> pd.DataFrame:
    """A generate run's manifest with its images downloaded under `dst` (absolute paths)."""
    require_stage_run(generate_run_id, STAGE)
    folder = download_run_dir(generate_run_id, "synthetic", dst)
    manifest = pd.read_csv(folder / "manifest.csv", keep_default_na=False)
    return manifest.assign(path=[str(folder / p) for p in manifest["path"]])
