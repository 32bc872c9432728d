"""The generator stages as MLflow runs: chaining, reuse, artifacts, on a real tracking server."""

from pathlib import Path

import mlflow
import pandas as pd
import pytest
from diffusers import StableDiffusionPipeline
from PIL import Image

from conftest import CONDITIONS, FAST, fast_configs, mlflow_run, runs_by_stage
from skindiff.core.labels import slug
from skindiff.diffusion.adapters import token_file_name
from skindiff.diffusion.base_model import resolve_base_model
from skindiff.diffusion.generate import GenerateConfig
from skindiff.diffusion.prompts import placeholder_token
from skindiff.errors import SkindiffError
from skindiff.tracking.generate import run_generate
from skindiff.tracking.runs import load_split


def test_generate_from_nothing_then_reuse(tracking: str, tmp_path: Path) -> None:
    mlflow_run("generate", tracking, tmp_path, **FAST)
    stages = runs_by_stage(tracking)
    assert {k: len(v) for k, v in stages.items()} == {
        "generate": 1,
        "prepare": 1,
        "textual_inversion": 1,
        "lora": 1,
    }
    (generate,) = stages["generate"]
    gen_id = generate.info.run_id
    for stage in ("prepare", "textual_inversion", "lora"):
        (child,) = stages[stage]
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == gen_id, stage
    ti_id = stages["textual_inversion"][0].info.run_id
    lora_id = stages["lora"][0].info.run_id
    assert generate.data.tags["skindiff.textual_inversion_run_id"] == ti_id
    assert generate.data.tags["skindiff.lora_run_id"] == lora_id

    # The artifacts are in the formats a stock diffusers pipeline loads.
    embeddings = mlflow.artifacts.download_artifacts(
        run_id=ti_id, artifact_path="embeddings", dst_path=str(tmp_path / "ti")
    )
    names = sorted(p.name for p in Path(embeddings).iterdir())
    assert names == sorted(token_file_name(placeholder_token(c)) for c in CONDITIONS)
    lora_file = mlflow.artifacts.download_artifacts(
        run_id=lora_id,
        artifact_path="lora/pytorch_lora_weights.safetensors",
        dst_path=str(tmp_path / "lora"),
    )
    pipe = StableDiffusionPipeline.from_pretrained(resolve_base_model("tiny"))
    for path in Path(embeddings).iterdir():
        pipe.load_textual_inversion(str(path))
    pipe.load_lora_weights(lora_file)

    manifest_path = mlflow.artifacts.download_artifacts(
        run_id=gen_id, artifact_path="synthetic", dst_path=str(tmp_path / "gen")
    )
    manifest = pd.read_csv(Path(manifest_path) / "manifest.csv")
    # num_per_image=2 images of every training image of the prepare run, each a file.
    train = load_split(stages["prepare"][0].info.run_id, "train")
    n_images = len(list((Path(manifest_path) / "images").iterdir()))
    assert len(manifest) == 2 * len(train) == generate.data.metrics["n_synthetic"] == n_images
    assert set(manifest["md5hash"]) == set(train["md5hash"])
    for path in manifest["path"]:
        with Image.open(Path(manifest_path) / path) as image:
            assert image.size == (32, 32)
    assert set(manifest["ti_run_id"]) == {ti_id} and set(manifest["lora_run_id"]) == {lora_id}
    assert set(manifest.loc[manifest["source_group"] == "light", "fitzpatrick_scale"]) <= {5, 6}
    assert (Path(manifest_path) / "grid.png").is_file()
    # Skin tone: measured per image, summarised in metrics, shown in a figure; prepare
    # measured the real images.
    metrics = generate.data.metrics
    assert manifest["kept"].all() and (manifest["attempt"] == 0).all()  # no filter by default
    assert metrics["on_target_fraction"] == pytest.approx(manifest["on_target"].mean())
    for fst, rows in manifest.groupby("fitzpatrick_scale"):
        assert metrics[f"ita_median_synthetic_fst{fst}"] == pytest.approx(rows["ita"].median())
    assert metrics["ita_median_source_light"] == pytest.approx(
        train.loc[train["group"] == "light", "ita"].median()
    )
    with Image.open(Path(manifest_path) / "skin_tone.png") as figure:
        assert figure.width >= 600
    prepare = stages["prepare"][0].data.metrics
    assert prepare["ita_dark_auc"] >= 0.95 and prepare["ita_fst_spearman"] < -0.8

    # Second call: the upstream runs are found, not run again.
    mlflow_run("generate", tracking, tmp_path, **FAST)
    again = runs_by_stage(tracking)
    assert {k: len(v) for k, v in again.items()} == {
        "generate": 2,
        "prepare": 1,
        "textual_inversion": 1,
        "lora": 1,
    }
    second = next(r for r in again["generate"] if r.info.run_id != gen_id)
    assert second.data.tags["skindiff.textual_inversion_run_id"] == ti_id
    assert second.data.tags["skindiff.run_key"] == generate.data.tags["skindiff.run_key"]


def test_vanilla_mode_needs_no_adapters(tracking: str) -> None:
    data, ti, lora, _ = fast_configs()
    run_id = run_generate(
        data,
        ti,
        lora,
        GenerateConfig(
            mode="img2img/vanilla", num_per_image=1, num_inference_steps=4, output_size=32
        ),
    )
    stages = runs_by_stage(tracking)
    assert set(stages) == {"generate", "prepare"}
    tags = mlflow.get_run(run_id).data.tags
    assert tags["skindiff.textual_inversion_run_id"] == "" and tags["skindiff.lora_run_id"] == ""


def test_wrong_upstream_run_is_refused(tracking: str) -> None:
    data, ti, lora, generate = fast_configs()
    from skindiff.tracking.prepare import run_prepare

    prepare_id = run_prepare(data)
    with pytest.raises(SkindiffError, match="is a prepare run, not a textual_inversion run"):
        run_generate(data, ti, lora, generate, prepare_run_id=prepare_id, ti_run_id=prepare_id)
    failed = [r for r in runs_by_stage(tracking)["generate"]]
    assert [r.info.status for r in failed] == ["FAILED"]


def test_stage_entry_points_chain_by_run_id(tracking: str, tmp_path: Path) -> None:
    ti_params = {k: v for k, v in FAST.items() if k.startswith("ti_") or k == "conditions"}
    mlflow_run("textual_inversion", tracking, tmp_path, **ti_params)
    (ti_run,) = runs_by_stage(tracking)["textual_inversion"]
    assert ti_run.info.status == "FINISHED" and ti_run.data.metrics["loss"] > 0
    assert len(mlflow.MlflowClient().get_metric_history(ti_run.info.run_id, "loss")) == 2
    # One curve per token; `loss` is their mean.
    per_token = [ti_run.data.metrics[f"loss/{slug(c)}"] for c in CONDITIONS]
    assert ti_run.data.metrics["loss"] == pytest.approx(sum(per_token) / len(per_token))

    lora_params = {k: v for k, v in FAST.items() if k.startswith("lora_") or k == "conditions"}
    mlflow_run("lora", tracking, tmp_path, ti_run_id=ti_run.info.run_id, **lora_params)
    stages = runs_by_stage(tracking)
    assert len(stages["textual_inversion"]) == 1  # the given run was used, none trained
    (lora_run,) = stages["lora"]
    assert lora_run.data.tags["skindiff.textual_inversion_run_id"] == ti_run.info.run_id
    assert lora_run.data.tags["mlflow.project.entryPoint"] == "lora"
