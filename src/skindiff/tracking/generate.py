"""Logs the `generate` stage: synthetic images, their manifest, a real/synthetic grid.

Upstream runs come from the given run ids, else from a finished run with the same key, else
they are run first (as child runs of the generate run).
"""

import tempfile
from pathlib import Path

import mlflow
import pandas as pd

from skindiff.data.prepare import PrepareConfig, content_digest
from skindiff.diffusion.figures import real_synthetic_pairs
from skindiff.diffusion.generate import GenerateConfig, generate_synthetic
from skindiff.diffusion.lora import LoraConfig
from skindiff.diffusion.textual_inversion import TextualInversionConfig
from skindiff.options import DATA, GENERATE, LORA, TEXTUAL_INVERSION, option_values
from skindiff.tracking.lora import TI_RUN_TAG, WEIGHTS_ARTIFACT, ensure_lora, upstream_key
from skindiff.tracking.prepare import ensure_prepare, load_split
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


def generate_key(
    config: GenerateConfig, train: pd.DataFrame, ti_run_id: str, lora_run_id: str
) -> str:
    """Same source images, settings, base model, tokens, LoRA and code: same images."""
    inputs = {
        "train": content_digest(train),
        "base_model": model_fingerprint(config.base_model),
        "textual_inversion": upstream_key(ti_run_id),
        "lora": upstream_key(lora_run_id),
    }
    return run_key(STAGE, option_values(GENERATE, config), inputs)


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
) -> str:
    """Generates `num_per_image` variants of every training image; returns the run id."""
    params = (
        option_values(DATA, data)
        | option_values(TEXTUAL_INVERSION, ti_config)
        | option_values(LORA, lora_config)
        | option_values(GENERATE, config)
        | {"ti_run_id": ti_run_id, "lora_run_id": lora_run_id}
    )
    run_name = f"{data.scenario}/seed-{data.seed}/{STAGE}/{config.mode}"
    with stage_run(STAGE, run_name, params) as run:
        prepare_run_id = prepare_run_id or ensure_prepare(data)
        ti_run_id, lora_run_id = adapter_runs(
            data, ti_config, lora_config, config, prepare_run_id, ti_run_id, lora_run_id
        )
        train = load_split(prepare_run_id, "train")
        key = generate_key(config, train, ti_run_id, lora_run_id)
        mlflow.set_tags(
            {
                RUN_KEY_TAG: key,
                PREPARE_RUN_TAG: prepare_run_id,
                TI_RUN_TAG: ti_run_id,
                LORA_RUN_TAG: lora_run_id,
            }
        )
        out_dir = work_dir(STAGE, key)
        with tempfile.TemporaryDirectory() as tmp:
            embeddings = lora_weights = None
            if ti_run_id:
                embeddings = fetch_upstream(
                    ti_run_id, "textual_inversion", "embeddings", config.base_model, Path(tmp)
                )
            if lora_run_id:
                lora_weights = fetch_upstream(
                    lora_run_id, "lora", WEIGHTS_ARTIFACT, config.base_model, Path(tmp)
                )
            manifest = generate_synthetic(config, train, out_dir, embeddings, lora_weights)
        manifest = manifest.assign(
            prepare_run_id=prepare_run_id, ti_run_id=ti_run_id, lora_run_id=lora_run_id
        )
        with tempfile.TemporaryDirectory() as tmp:
            manifest.to_csv(Path(tmp) / "manifest.csv", index=False)
            real_synthetic_pairs(manifest, out_dir).save(Path(tmp) / "grid.png")
            mlflow.log_artifacts(tmp, "synthetic")
        mlflow.log_artifacts(str(out_dir / "images"), "synthetic/images")
        mlflow.log_metric("n_synthetic", len(manifest))
        for fst, n in manifest.groupby("fitzpatrick_scale").size().items():
            mlflow.log_metric(f"n_synthetic_fst{fst}", n)
    return run.info.run_id


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
    found = find_finished_run(generate_key(config, train, ti_run_id, lora_run_id))
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
