"""The generate stage on the tiny model: plan, manifest, determinism, resume, modes, adapters."""

import dataclasses
import io
import json
import logging
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import (
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, get_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file, save_file
from torch._dynamo.utils import counters
from transformers.utils.logging import warning_once

from conftest import stock_tiny_pipeline
from skindiff.core.library_logs import LibraryMessage, without_messages
from skindiff.data.fitzpatrick import CONDITIONS
from skindiff.data.prepare import PrepareConfig, prepare_scenario
from skindiff.diffusion import generate
from skindiff.diffusion.adapters import (
    LORA_WEIGHTS_FILE,
    NEW_EMBEDDINGS_NOTE,
    NO_TEXT_ENCODER_LORA,
    token_file_name,
)
from skindiff.diffusion.base_model import resolve_base_model
from skindiff.diffusion.config import GenerationMode, SchedulerName
from skindiff.diffusion.generate import (
    MANIFEST_COLUMNS,
    PLAN_COLUMNS,
    GenerateConfig,
    generate_synthetic,
    plan_generation,
)
from skindiff.diffusion.prompts import SKIN_TYPE_PHRASES, placeholder_token
from skindiff.errors import SkindiffError

SMALL = GenerateConfig(
    mode="img2img/vanilla",
    num_per_image=2,
    num_inference_steps=6,
    output_size=32,
    generation_batch_size=3,
)
TINY_HIDDEN_SIZE = 32  # width of the tiny text encoder's token embeddings


@pytest.fixture(scope="module")
def full_train(demo_dataset) -> pd.DataFrame:
    return prepare_scenario(PrepareConfig(scenario="i", seed=0)).splits.train


@pytest.fixture(scope="module")
def train(full_train: pd.DataFrame) -> pd.DataFrame:
    """8 training rows, light and dark: 16 images under SMALL, in batches of 3 (the last of 1)."""
    return pd.concat([full_train[full_train["group"] == g].head(4) for g in ("light", "dark")])


def write_embeddings(folder: Path, labels: list[str], seed: int) -> Path:
    """One random diffusers-format Textual-Inversion file per condition."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    for label in labels:
        token = placeholder_token(label)
        embedding = torch.randn(1, TINY_HIDDEN_SIZE, generator=generator)
        save_file({token: embedding}, folder / token_file_name(token))
    return folder


def write_lora(folder: Path) -> Path:
    """A diffusers-format LoRA of the tiny UNet whose B matrices are not zero, so it acts."""
    unet = UNet2DConditionModel.from_pretrained(resolve_base_model("tiny") / "unet")
    unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=4,
            init_lora_weights="gaussian",
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    )
    return folder


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "embeddings_dir": write_embeddings(root / "ti", list(CONDITIONS), seed=0),
        "lora_weights": write_lora(root / "lora"),
    }


@pytest.fixture(scope="module")
def reference(train: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted SMALL run."""
    out_dir = tmp_path_factory.mktemp("reference") / "out"
    generate_synthetic(SMALL, train, out_dir, progress=False)
    return out_dir


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too) by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def pixels(out_dir: Path) -> np.ndarray:
    """The images of a run, in manifest order, as one float array."""
    arrays = []
    for path in pd.read_csv(out_dir / "manifest.csv")["path"]:
        with Image.open(out_dir / path) as image:
            arrays.append(np.asarray(image, float))
    return np.stack(arrays)


def test_plan_targets_prompts_and_seeds(full_train: pd.DataFrame):
    plan = plan_generation(GenerateConfig(mode="img2img/ti+lora"), full_train)
    assert list(plan.columns) == list(PLAN_COLUMNS)
    assert len(plan) == 5 * len(full_train)
    assert plan["seed"].is_unique and plan["path"].is_unique
    light = plan[plan["source_group"] == "light"]
    dark = plan[plan["source_group"] == "dark"]
    # A light source's variants share one target (the reference's 5 images of one prompt);
    # sources draw theirs apart, so both types occur, each on a fair share of the sources.
    targets = light.groupby("md5hash")["fitzpatrick_scale"].agg(["nunique", "first"])
    assert (targets["nunique"] == 1).all()
    assert 0.3 < (targets["first"] == 5).mean() < 0.7, targets["first"].value_counts()
    assert set(targets["first"]) == {5, 6}
    assert (dark["fitzpatrick_scale"] == dark["source_fitzpatrick_scale"]).all()
    assert (plan["group"] == "dark").all()
    for row in plan.itertuples():
        assert SKIN_TYPE_PHRASES[row.fitzpatrick_scale] + " individual" in row.prompt
        assert placeholder_token(row.label) in row.prompt
    words = plan_generation(GenerateConfig(mode="txt2img/vanilla"), full_train)
    assert all(
        f"An image of {label} on" in p for label, p in zip(words.label, words.prompt, strict=True)
    )
    assert words["strength"].isna().all()
    medium = plan_generation(GenerateConfig(target_fst=(4,)), full_train)
    assert (
        medium.loc[medium["source_group"] == "light", ["fitzpatrick_scale", "group"]]
        == [4, "light"]
    ).all(axis=None)
    # A row's seeds and targets depend on that row only, not on the rest of the training set.
    subset = plan_generation(GenerateConfig(mode="img2img/ti+lora"), full_train.tail(3))
    pd.testing.assert_frame_equal(subset, plan.tail(15).reset_index(drop=True))


@pytest.mark.parametrize(
    ("change", "parameter"),
    [
        ({"mode": "img2img/dreambooth"}, "mode"),
        ({"strength": 0.0}, "strength"),
        ({"strength": 1.5}, "strength"),
        ({"strength": 0.1, "num_inference_steps": 5}, "strength x num_inference_steps"),
        ({"num_per_image": 0}, "num_per_image"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"generation_batch_size": 0}, "generation_batch_size"),
        ({"target_fst": (5, 7)}, "target_fst"),
        ({"target_fst": ()}, "target_fst"),
        ({"scheduler": "magic"}, "scheduler"),
        ({"resolution": 100}, "resolution"),
    ],
)
def test_bad_config_is_refused(change: dict, parameter: str):
    with pytest.raises(SkindiffError, match=parameter):
        GenerateConfig(**change)


def test_bad_train_is_refused(train: pd.DataFrame):
    with pytest.raises(SkindiffError, match="path"):
        plan_generation(SMALL, train.drop(columns="path"))
    with pytest.raises(SkindiffError, match="duplicate md5hash"):
        plan_generation(SMALL, pd.concat([train, train.head(1)]))


def test_manifest_and_images(reference: Path, train: pd.DataFrame):
    manifest = pd.read_csv(reference / "manifest.csv", dtype={"md5hash": str})
    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    default = io.BytesIO()
    Image.new("RGB", (8, 8)).save(default, format="JPEG")
    default_jpeg_tables = Image.open(default).quantization
    assert len(manifest) == 2 * len(train)
    assert set(manifest["md5hash"]) == set(train["md5hash"])
    for path in manifest["path"]:
        assert path.endswith(".jpg")
        data = (reference / path).read_bytes()
        assert data.startswith(b"\xff\xd8") and data.endswith(b"\xff\xd9")  # a whole JPEG
        with Image.open(reference / path) as image:
            image.load()
            assert image.format == "JPEG"
            assert image.size == (32, 32) and image.mode == "RGB"
            tables = image.quantization
        assert tables == default_jpeg_tables  # PIL's default quality, as the reference saves
    assert json.loads((reference / "run.json").read_text())["seed"] == 0


def test_same_seed_is_byte_identical_and_another_seed_differs(
    reference: Path, train: pd.DataFrame, tmp_path: Path
):
    generate_synthetic(SMALL, train, tmp_path / "again", progress=False)
    assert folder_bytes(tmp_path / "again") == folder_bytes(reference)
    other = dataclasses.replace(SMALL, seed=1)
    generate_synthetic(other, train, tmp_path / "seed1", progress=False)
    difference = np.abs(pixels(tmp_path / "seed1") - pixels(reference)).mean(axis=(1, 2, 3))
    assert (difference > 0).all()


def test_truncated_images_are_made_again(reference: Path, train: pd.DataFrame, tmp_path: Path):
    """A JPEG cut short (a power cut after the rename) is incomplete, even with all but the
    last byte of its end marker, and a second run rewrites it as the first made it."""
    out_dir = tmp_path / "out"
    shutil.copytree(reference, out_dir)
    paths = [out_dir / path for path in pd.read_csv(out_dir / "manifest.csv")["path"]]
    paths[0].write_bytes(paths[0].read_bytes()[:-1])
    paths[7].write_bytes(paths[7].read_bytes()[:200])
    assert not any(generate._is_complete(paths[k], SMALL.output_size) for k in (0, 7))
    assert generate._is_complete(paths[1], SMALL.output_size)
    generate_synthetic(SMALL, train, out_dir, progress=False)
    assert folder_bytes(out_dir) == folder_bytes(reference)


KILLED_RUN = """
import json, os, signal, sys
import pandas as pd
from skindiff.diffusion import generate

saved, save = [], generate._save_image

def save_then_die(image, path):
    if len(saved) == 12:  # four whole batches of 3 are on disk: die while writing the 13th
        (path.parent / f".{path.name}.tmp-0123abcd").write_bytes(b"half a jpeg")
        os.kill(os.getpid(), signal.SIGKILL)
    save(image, path)
    saved.append(path)

generate._save_image = save_then_die
generate.generate_synthetic(
    generate.GenerateConfig(**json.loads(sys.argv[1])), pd.read_pickle(sys.argv[2]), sys.argv[3]
)
"""


@pytest.mark.slow  # a subprocess, killed
def test_killed_run_resumes_to_identical_files(
    reference: Path, train: pd.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    train.to_pickle(tmp_path / "train.pkl")
    out_dir = tmp_path / "out"
    settings = json.dumps(dataclasses.asdict(SMALL))
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, settings, str(tmp_path / "train.pkl"), str(out_dir)],
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out_dir / "manifest.csv").exists()
    plan = plan_generation(SMALL, train)
    images = [out_dir / path for path in plan["path"]]
    assert [p.exists() for p in images] == [True] * 12 + [False] * 4
    # Damage one image in each of batches 1-3, keep batch 4 whole.
    images[1].unlink()
    images[3].write_bytes(images[3].read_bytes()[:200])
    images[6].write_bytes(b"")
    with Image.open(images[8]) as image:
        image.resize((16, 16)).save(images[8])
    untouched = {p: p.stat().st_mtime_ns for p in images[9:12]}

    batches = []
    real_batch = generate.generate_batch

    def recording_batch(pipe, config, chunk, *args):
        batches.append(list(chunk.index))
        return real_batch(pipe, config, chunk, *args)

    monkeypatch.setattr(generate, "generate_batch", recording_batch)
    generate_synthetic(SMALL, train, out_dir, progress=False)
    assert batches == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [12, 13, 14], [15]]
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched
    # The killed process's temporary never became an image; everything else is the same.
    leftover = f"{Path(plan['path'][12]).parent}/.{Path(plan['path'][12]).name}.tmp-0123abcd"
    resumed = folder_bytes(out_dir)
    assert resumed.pop(leftover) == b"half a jpeg"
    assert resumed == folder_bytes(reference)


def test_resume_with_other_settings_is_refused(reference: Path, train: pd.DataFrame):
    before = folder_bytes(reference)
    with pytest.raises(SkindiffError, match=r"other settings or inputs \(guidance_scale, .*seed\)"):
        generate_synthetic(
            dataclasses.replace(SMALL, seed=3, guidance_scale=4.0), train, reference, progress=False
        )
    with pytest.raises(SkindiffError, match="plan_sha256"):
        generate_synthetic(SMALL, train.head(4), reference, progress=False)
    assert folder_bytes(reference) == before


def test_refuses_a_foreign_out_dir(train: pd.DataFrame, tmp_path: Path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SkindiffError, match="not empty"):
        generate_synthetic(SMALL, train, tmp_path, progress=False)


def test_an_out_dir_that_cannot_be_made_is_one_clear_error(train: pd.DataFrame, tmp_path: Path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    with pytest.raises(SkindiffError, match=re.escape(f"work folder {blocker / 'out'}: ")):
        generate_synthetic(SMALL, train, blocker / "out", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    assert blocker.read_text() == "mine"


def run_mode(mode: str, train: pd.DataFrame, out_dir: Path, **files) -> np.ndarray:
    """Two images (one light source, one dark) in `mode`; their pixels. Checks that the images
    came from the mode's pipeline (read from the mode's name: img2img or txt2img), whose
    tokenizer knows the Textual Inversion tokens exactly when the mode uses them."""
    config = dataclasses.replace(SMALL, mode=mode, num_per_image=1, num_inference_steps=4)
    two = pd.concat([train.head(1), train.tail(1)])
    used, real_batch = [], generate.generate_batch

    def recording(pipe, config, chunk, *args):
        used.append(pipe)
        return real_batch(pipe, config, chunk, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(generate, "generate_batch", recording)
        manifest = generate_synthetic(config, two, out_dir, progress=False, **files)
    assert (manifest["mode"] == mode).all()
    pipeline, adapters = str(mode).split("/")
    expected = {"img2img": StableDiffusionImg2ImgPipeline, "txt2img": StableDiffusionPipeline}
    assert used and {type(pipe) for pipe in used} == {expected[pipeline]}, mode
    uses_ti = "ti" in adapters.split("+")
    vocab = used[0].tokenizer.get_vocab()
    for label in two["label"]:
        assert (placeholder_token(label) in vocab) == uses_ti, (mode, label)
    return pixels(out_dir)


def test_every_mode_runs_and_adapters_change_the_images(
    train: pd.DataFrame, adapters: dict[str, Path], tmp_path: Path
):
    results = {}
    for mode in GenerationMode:
        config = GenerateConfig(mode=mode)
        wanted = {
            "embeddings_dir": adapters["embeddings_dir"] if config.uses_ti else None,
            "lora_weights": adapters["lora_weights"] if config.uses_lora else None,
        }
        results[mode] = run_mode(mode, train, tmp_path / mode.replace("/", "-"), **wanted)
    # Same prompt and seeds: only the LoRA weights tell these apart.
    assert np.abs(results["img2img/lora"] - results["img2img/vanilla"]).mean() > 0
    # Same token prompt and seeds: only the embedding vectors tell these apart.
    other = write_embeddings(tmp_path / "other-ti", list(CONDITIONS), seed=1)
    ti_again = run_mode("img2img/ti", train, tmp_path / "ti-other", embeddings_dir=other)
    assert np.abs(ti_again - results["img2img/ti"]).mean() > 0


@pytest.mark.parametrize("name", list(SchedulerName))
def test_scheduler_option_sets_the_pipeline_scheduler(name: SchedulerName):
    expected = generate.SCHEDULERS.get(name, PNDMScheduler)  # default: the tiny model's own
    for mode in ("img2img/vanilla", "txt2img/vanilla"):
        config = dataclasses.replace(SMALL, mode=mode, scheduler=name)
        pipe, _ = generate.load_pipeline(config, {}, None)
        assert type(pipe.scheduler) is expected, mode


def test_other_scheduler_runs(train: pd.DataFrame, tmp_path: Path, monkeypatch):
    used, real_batch = [], generate.generate_batch

    def recording(pipe, config, chunk, *args):
        used.append(type(pipe.scheduler))
        return real_batch(pipe, config, chunk, *args)

    monkeypatch.setattr(generate, "generate_batch", recording)
    config = dataclasses.replace(SMALL, num_per_image=1, scheduler="dpm++")
    generate_synthetic(config, train.head(2), tmp_path, progress=False)
    assert used and set(used) == {generate.SCHEDULERS[SchedulerName.DPM_PLUS_PLUS]}


def test_missing_adapters_are_clear_errors(
    train: pd.DataFrame, adapters: dict[str, Path], tmp_path: Path
):
    with pytest.raises(SkindiffError, match="embeddings_dir"):
        generate_synthetic(GenerateConfig(mode="img2img/ti"), train, tmp_path / "a")
    partial = tmp_path / "partial"
    partial.mkdir()
    token = placeholder_token(train["label"].iloc[0])
    shutil.copy(adapters["embeddings_dir"] / token_file_name(token), partial)
    missing = sorted({placeholder_token(label) for label in train["label"]} - {token})
    with pytest.raises(SkindiffError, match=f"no embedding for {missing[0]}"):
        generate_synthetic(GenerateConfig(mode="txt2img/ti"), train, tmp_path / "b", partial)
    with pytest.raises(SkindiffError, match="lora_weights"):
        generate_synthetic(
            GenerateConfig(mode="img2img/ti+lora"),
            train,
            tmp_path / "c",
            embeddings_dir=adapters["embeddings_dir"],
            lora_weights=tmp_path / "nowhere",
        )
    assert not any((tmp_path / name).exists() for name in "abc")


def library_notes(log: pytest.LogCaptureFixture) -> set[LibraryMessage]:
    """Which of the notes skindiff drops when it loads adapters were logged."""
    logged = [record.getMessage() for record in log.records]
    notes = (NEW_EMBEDDINGS_NOTE, NO_TEXT_ENCODER_LORA)
    return {note for note in notes if any(text.startswith(note.start) for text in logged)}


def test_adapters_load_without_the_library_notes_that_do_not_apply(
    adapters: dict[str, Path], library_log: pytest.LogCaptureFixture, tmp_path: Path
):
    config = dataclasses.replace(SMALL, mode="img2img/ti+lora")
    embeddings, lora_file = generate.adapter_files(
        config, adapters["embeddings_dir"], adapters["lora_weights"]
    )
    generate.load_pipeline(config, embeddings, lora_file)
    assert library_notes(library_log) == set()

    # The stock calls log both: what the console would show without skindiff's filters.
    library_log.clear()
    warning_once.cache_clear()  # transformers logs its note once per process
    stock = stock_tiny_pipeline()
    stock.load_textual_inversion([str(path) for path in embeddings])
    stock.load_lora_weights(str(lora_file))
    assert library_notes(library_log) == {NEW_EMBEDDINGS_NOTE, NO_TEXT_ENCODER_LORA}

    # A LoRA file with weights for a text encoder this pipeline lacks (SDXL's second): diffusers
    # drops them, and its note says so.
    library_log.clear()
    q_proj = stock.text_encoder.get_submodule("encoder.layers.0.self_attn.q_proj")
    prefix = "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer"
    foreign = load_file(lora_file) | {
        f"{prefix}.down.weight": q_proj.weight[:4].clone(),
        f"{prefix}.up.weight": q_proj.weight[:, :4].clone(),
    }
    save_file(foreign, tmp_path / LORA_WEIGHTS_FILE)
    generate.load_pipeline(config, embeddings, tmp_path / LORA_WEIGHTS_FILE)
    assert library_notes(library_log) == {NO_TEXT_ENCODER_LORA}


def test_dropped_messages_are_only_those_named_and_only_in_the_block(
    library_log: pytest.LogCaptureFixture,
):
    logger = logging.getLogger(NO_TEXT_ENCODER_LORA.logger)
    note = NO_TEXT_ENCODER_LORA.start + " found with the prefix='text_encoder'."
    with without_messages(NO_TEXT_ENCODER_LORA):
        logger.warning(note)
        logger.warning("No LoRA keys associated to UNet2DConditionModel found")
        logging.getLogger("diffusers.loaders.peft").warning(note)
    logger.warning(note)
    assert [(r.name, r.getMessage()) for r in library_log.records] == [
        (logger.name, "No LoRA keys associated to UNet2DConditionModel found"),
        ("diffusers.loaders.peft", note),
        (logger.name, note),
    ]


def stock_pipeline_images(pipe, config: GenerateConfig, chunk: pd.DataFrame, resolution: int):
    """A chunk as one stock pipeline call makes it, prompts as text and source images as
    pictures (it encodes each source once per variant), resized as `generate_batch` does."""
    sources = [generate._source_image(path, resolution) for path in chunk["source_path"]]
    images = pipe(
        prompt=list(chunk["prompt"]),
        image=sources,
        strength=config.strength,
        num_inference_steps=config.num_inference_steps,
        guidance_scale=config.guidance_scale,
        generator=[torch.Generator().manual_seed(int(seed)) for seed in chunk["seed"]],
    ).images
    return as_array([i.resize((config.output_size,) * 2, Image.Resampling.BICUBIC) for i in images])


def as_array(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.float64) for image in images])


def test_fast_path_makes_the_stock_pipelines_images(train: pd.DataFrame, adapters: dict[str, Path]):
    """Encoding each source and prompt once gives the stock pipeline's images: bit for bit with
    the same memory layout and one prompt per batch (the same arithmetic), and within 1/255 on
    average with channels-last and mixed prompts (where the order of the arithmetic changes)."""
    config = dataclasses.replace(SMALL, mode="img2img/ti+lora", num_per_image=3)
    embeddings, lora_file = generate.adapter_files(
        config, adapters["embeddings_dir"], adapters["lora_weights"], list(train["label"])
    )
    pipe, resolution = generate.load_pipeline(config, embeddings, lora_file)
    plan = plan_generation(config, pd.concat([train.head(1), train.tail(1)]))
    fast = as_array(generate.generate_batch(pipe, config, plan, resolution))
    for module in (pipe.unet, pipe.vae):
        module.to(memory_format=torch.contiguous_format)
    stock = stock_pipeline_images(pipe, config, plan, resolution)
    assert plan["prompt"].nunique() > 1
    difference = np.abs(fast - stock).mean()
    assert difference < 1, difference  # (0 on the CPUs measured so far)
    # What an error of the fast path would look like: another variant's noise.
    shifted = plan.assign(seed=plan["seed"].shift(1, fill_value=0))
    assert np.abs(stock_pipeline_images(pipe, config, shifted, resolution) - stock).mean() > 1

    one_source = plan.tail(config.num_per_image)  # a dark source: its variants keep its FST
    assert one_source["prompt"].nunique() == 1 and one_source["source_group"].eq("dark").all()
    same = as_array(generate.generate_batch(pipe, config, one_source, resolution))
    assert np.array_equal(same, stock_pipeline_images(pipe, config, one_source, resolution))


@pytest.mark.slow  # torch.compile: about 20 s the first time on a machine
def test_compiled_unet_makes_the_same_images_to_float_rounding(
    train: pd.DataFrame, adapters: dict[str, Path]
):
    config = dataclasses.replace(SMALL, mode="img2img/ti+lora")
    embeddings, lora_file = generate.adapter_files(
        config, adapters["embeddings_dir"], adapters["lora_weights"], list(train["label"])
    )
    compiled_config = dataclasses.replace(config, compile_unet=True)
    compiled, resolution = generate.load_pipeline(compiled_config, embeddings, lora_file)
    eager, _ = generate.load_pipeline(config, embeddings, lora_file)
    assert compiled.unet._compiled_call_impl is not None
    assert eager.unet._compiled_call_impl is None
    plan = plan_generation(config, train.head(3)).head(config.generation_batch_size)
    graphs = counters["stats"]["unique_graphs"]
    fast = as_array(generate.generate_batch(compiled, config, plan, resolution))
    assert counters["stats"]["unique_graphs"] > graphs  # the UNet did run compiled
    slow = as_array(generate.generate_batch(eager, config, plan, resolution))
    assert np.abs(fast - slow).mean() < 1, np.abs(fast - slow).mean()
    # What an error would look like: another image's noise.
    shifted = plan.assign(seed=plan["seed"].shift(1, fill_value=0))
    other = as_array(generate.generate_batch(eager, config, shifted, resolution))
    assert np.abs(other - slow).mean() > 1
    # Compiled code runs the same every time.
    assert np.array_equal(
        fast, as_array(generate.generate_batch(compiled, config, plan, resolution))
    )


@pytest.mark.slow  # torch.compile traces the UNet before it fails
def test_a_unet_that_cannot_be_compiled_is_one_clear_error(
    train: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
):
    from torch._inductor import config as inductor

    # A machine without a C++ compiler, and nothing compiled before to fall back on.
    monkeypatch.setattr(inductor.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(inductor, "fx_graph_cache", False)
    torch._dynamo.reset()
    config = dataclasses.replace(SMALL, compile_unet=True)
    embeddings, lora_file = generate.adapter_files(config, None, None)
    pipe, resolution = generate.load_pipeline(config, embeddings, lora_file)
    plan = plan_generation(config, train.head(1))
    with pytest.raises(SkindiffError, match=r"^compile_unet: torch.compile could not .*C\+\+"):
        generate.generate_batch(pipe, config, plan, resolution)
    torch._dynamo.reset()
