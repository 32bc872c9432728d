"""The generator as a registered pyfunc model, on a real tracking server: it loads by alias and
generates, refuses bad input rows and oversized requests before generating, the champion alias
moves only on improvement, `generate` runs from it."""

import base64
import hashlib
import io
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from PIL import Image

from conftest import CONDITIONS, fast_configs, recording_calls, runs_by_stage
from skindiff.diffusion.generate import GenerateConfig, image_seed
from skindiff.diffusion.prompts import placeholder_token
from skindiff.errors import SkindiffError
from skindiff.tracking import generate as tracking_generate
from skindiff.tracking import registry
from skindiff.tracking.generate import ensure_generator_chain, run_generate
from skindiff.tracking.prepare import ensure_prepare
from skindiff.tracking.registry import (
    CHAMPION_ALIAS,
    PackagedGenerator,
    generator_frozen_params,
    log_generator_model,
    register_generator,
)
from skindiff.tracking.runs import load_split

FROZEN = {"ti_learning_rate": "0.0005", "strength": "0.5"}


@pytest.fixture(scope="module")
def generator(tracking_server: str) -> dict:
    """TI and LoRA runs of a few steps and a generator model logged from them, made once in an
    experiment of their own (tests reach them by id and URI from theirs)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", tracking_server)
        mlflow.set_tracking_uri(tracking_server)
        # set_experiment exports MLFLOW_EXPERIMENT_ID: set here, it goes with the patch
        experiment_id = mlflow.create_experiment(f"registry-{time.time_ns()}")
        patch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
        mlflow.set_experiment(experiment_id=experiment_id)
        data, ti_config, lora_config, config = fast_configs()
        prepare = ensure_prepare(data)
        ti, lora, _ = ensure_generator_chain(data, ti_config, lora_config, config, prepare)
        with mlflow.start_run(run_name="tune"):
            uri = log_generator_model(ti, lora, config, FROZEN)
        train = load_split(prepare, "train")
    return {"uri": uri, "ti": ti, "config": config, "train": train}


@pytest.fixture(scope="module")
def model(generator: dict, tracking_server: str) -> mlflow.pyfunc.PyFuncModel:
    """The generator model, loaded once for the tests of what predict refuses."""
    mlflow.set_tracking_uri(tracking_server)
    return mlflow.pyfunc.load_model(generator["uri"])


def unique_name(request: pytest.FixtureRequest) -> str:
    return f"{request.node.name}-{time.time_ns()}"


def decode(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def test_champion_loads_by_alias_and_generates(
    tracking: str, generator: dict, request: pytest.FixtureRequest
) -> None:
    name = unique_name(request)
    register_generator(generator["uri"], name, "i", "val_f1_macro", 0.4)
    model = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION_ALIAS}")
    sources = list(generator["train"]["path"][:2])
    as_base64 = base64.b64encode(Path(sources[1]).read_bytes()).decode()
    table = pd.DataFrame(
        {
            "image": [sources[0], as_base64],
            "condition": list(CONDITIONS),
            "target_fst": [5, 6],
            "n": [2, 1],
        }
    )
    out = model.predict(table)
    assert list(out["row"]) == [0, 0, 1] and list(out["index"]) == [0, 1, 0]
    assert list(out["condition"]) == [CONDITIONS[0], CONDITIONS[0], CONDITIONS[1]]
    assert list(out["fitzpatrick_scale"]) == [5, 5, 6]
    size = generator["config"].output_size
    assert all(decode(image).size == (size, size) for image in out["image"])
    # Seeds as the generate stage derives them, the MD5 of the image bytes naming the source.
    md5 = hashlib.md5(Path(sources[1]).read_bytes()).hexdigest()
    assert out["seed"].iloc[2] == image_seed(generator["config"].seed, md5, 0)
    # Same input, same images (a batch of other images may change the last bits of the
    # UNet's arithmetic, so the whole table again); the two images of one source differ.
    again = model.predict(table)
    assert list(again["image"]) == list(out["image"])
    assert out["image"].iloc[0] != out["image"].iloc[1]
    assert generator_frozen_params(f"models:/{name}@{CHAMPION_ALIAS}") == FROZEN


def predict_error(model: mlflow.pyfunc.PyFuncModel, images: list[str], counts: list[int]) -> str:
    """The one-line error of a predict call on rows of these images and counts."""
    table = pd.DataFrame(
        {
            "image": images,
            "condition": [CONDITIONS[k % 2] for k in range(len(images))],
            "target_fst": [6] * len(images),
            "n": counts,
        }
    )
    with pytest.raises(SkindiffError) as refused:
        model.predict(table)
    return str(refused.value)


def test_predict_names_the_row_and_the_value_of_a_bad_image(
    model: mlflow.pyfunc.PyFuncModel,
    generator: dict,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    batches = recording_calls(monkeypatch, registry, "generate_batch", lambda *args, **kw: 1)
    good = generator["train"]["path"].iloc[0]
    notes = tmp_path / "notes.txt"
    notes.write_text("a note, not an image")
    assert predict_error(model, [good, str(notes)], [1, 1]) == (
        f"row 1: image {str(notes)!r} is not an image"
    )
    text = base64.b64encode(b"no image bytes either" * 4).decode()
    assert predict_error(model, [good, text], [1, 1]) == (
        f"row 1: image {text[:40]!r}... ({len(text)} characters) is not an image"
    )
    assert predict_error(model, [good, "lesion.jpg"], [1, 1]) == (
        "row 1: image 'lesion.jpg' is neither an existing file nor base64 image bytes"
    )
    assert batches == []  # refused before generating row 0's image


def test_predict_refuses_more_images_than_its_limits(
    model: mlflow.pyfunc.PyFuncModel, generator: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = recording_calls(monkeypatch, registry, "generate_batch", lambda *args, **kw: 1)
    good = generator["train"]["path"].iloc[0]
    assert predict_error(model, [good, good], [1, 10**6]) == (
        "row 1: n must be 0 to 64 images per row, got 1000000"
    )
    assert predict_error(model, [good] * 17, [64] * 17) == (
        "n adds up to 1088 images; one predict call makes at most 1024: split the table over "
        "several calls"
    )
    assert batches == []


def test_champion_moves_only_on_improvement(
    tracking: str, generator: dict, request: pytest.FixtureRequest
) -> None:
    name = unique_name(request)
    results = [
        register_generator(generator["uri"], name, scenario, "val_f1_macro", value)
        for scenario, value in (("i", 0.5), ("i", 0.7), ("ii", 0.6), ("i", 0.7))
    ]
    assert results == [("1", True), ("2", True), ("3", False), ("4", False)]
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    assert champion.version == "2"
    assert champion.tags == {"scenario": "i", "objective": "val_f1_macro", "value": "0.7"}
    assert client.get_model_version(name, "3").tags["scenario"] == "ii"
    assert register_generator(generator["uri"], name, "i", "val_f1_macro", 0.71) == ("5", True)
    # Another objective's value is not comparable, however high: the champion stays.
    assert register_generator(generator["uri"], name, "i", "test_f1_macro", 0.9) == ("6", False)
    assert client.get_model_version_by_alias(name, CHAMPION_ALIAS).version == "5"


def test_generate_from_registered_model(
    tracking: str,
    generator: dict,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = unique_name(request)
    register_generator(generator["uri"], name, "i", "val_f1_macro", 0.5)
    uri = f"models:/{name}@{CHAMPION_ALIAS}"
    data, ti_config, lora_config, _ = fast_configs()
    # The model's settings win over the command's; the command keeps the per-run ones.
    command = GenerateConfig(
        mode="txt2img/vanilla", num_per_image=1, num_inference_steps=50, output_size=24, seed=3
    )
    run_id = run_generate(data, ti_config, lora_config, command, generator_uri=uri)
    assert set(runs_by_stage(tracking)) == {"generate", "prepare"}
    run = mlflow.get_run(run_id)
    assert run.data.params["generator_uri"] == uri
    assert run.data.tags["skindiff.generator_uri"] == uri
    assert run.data.tags["skindiff.generator.num_inference_steps"] == "4"
    folder = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="synthetic")
    manifest = pd.read_csv(Path(folder) / "manifest.csv")
    assert len(manifest) == run.data.metrics["n_synthetic"] == len(generator["train"])
    assert set(manifest["num_inference_steps"]) == {4}
    assert set(manifest["mode"]) == {generator["config"].mode}
    assert manifest["prompt"].str.contains(placeholder_token(CONDITIONS[0])).any()
    with Image.open(Path(folder) / manifest["path"].iloc[0]) as image:
        assert image.size == (24, 24)

    # The run key follows the model's contents, not the URI that names it: the same model by
    # another URI gives the same key ...
    key = run.data.tags["skindiff.run_key"]
    again = run_generate(data, ti_config, lora_config, command, generator_uri=generator["uri"])
    assert mlflow.get_run(again).data.tags["skindiff.run_key"] == key

    # ... and the same URI with other weights (their digests) gives another. Generation is
    # stopped once the run is open and keyed.
    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    real_digest = PackagedGenerator.weights_digest
    monkeypatch.setattr(
        PackagedGenerator,
        "weights_digest",
        lambda self: {name: "0" * 64 for name in real_digest(self)},
    )
    monkeypatch.setattr(tracking_generate, "generate_synthetic", stop)
    with pytest.raises(Stop):
        run_generate(data, ti_config, lora_config, command, generator_uri=uri)
    (changed,) = [r for r in runs_by_stage(tracking)["generate"] if r.info.status == "FAILED"]
    assert changed.data.params["generator_uri"] == uri
    assert changed.data.tags["skindiff.run_key"] != key


def test_bad_generator_uri_is_refused(tracking: str, generator: dict) -> None:
    data, ti_config, lora_config, config = fast_configs()
    with pytest.raises(SkindiffError, match="does not resolve"):
        run_generate(data, ti_config, lora_config, config, generator_uri="models:/no-such@champion")
    not_a_model = f"runs:/{generator['ti']}/embeddings"
    with pytest.raises(SkindiffError, match="is not a skindiff generator model"):
        run_generate(data, ti_config, lora_config, config, generator_uri=not_a_model)
    # The model is checked before the run opens: nothing half-logged is left behind.
    assert "generate" not in runs_by_stage(tracking)
