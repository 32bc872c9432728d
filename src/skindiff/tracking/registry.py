"""The generator as a registered MLflow model: an `mlflow.pyfunc` model that packages the TI
embeddings, the LoRA weights, a reference to the base model (its name, not its weights), the
generation settings and the frozen hyperparameters, and makes images from a table of
(image, condition, target skin type, count).

Versions of the registered model carry the tags scenario, objective, value and tune_seed
(the data seed tuned on); the alias `champion` moves to a new version only when its value beats
the champion's.
"""

import base64
import binascii
import hashlib
import io
import json
import logging
import math
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from importlib.metadata import PackageNotFoundError, requires
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, Schema
from PIL import Image
from tqdm.auto import tqdm

import skindiff
from skindiff.core.seeding import image_seed
from skindiff.core.settings import Precision, as_text
from skindiff.data.images import load_rgb
from skindiff.diffusion.config import GenerateConfig
from skindiff.diffusion.generate import adapter_files, generate_batch, load_pipeline
from skindiff.diffusion.prompts import SKIN_TYPE_PHRASES, placeholder_token, skin_prompt
from skindiff.errors import SkindiffError
from skindiff.tracking.frozen import read_frozen_params, write_frozen_params
from skindiff.tracking.names import (
    CHAMPION_ALIAS,
    EMBEDDINGS_DIR,
    FROZEN_PARAMS_FILE,
    GENERATOR_MODEL,
    LORA_WEIGHTS_ARTIFACT,
    TUNE_SEED_VERSION_TAG,
    Stage,
)
from skindiff.tracking.runs import fetch_upstream

logger = logging.getLogger(__name__)

# MLmodel metadata that marks a skindiff generator (other pyfunc models lack it).
KIND_KEY = "skindiff_model"
SETTINGS_FILE = "generate_config.json"
# The settings a generator model fixes; `generate` with a model takes only the others.
MODEL_SETTINGS = (
    "base_model",
    "mode",
    "strength",
    "guidance_scale",
    "num_inference_steps",
    "scheduler",
    "resolution",
)

SIGNATURE = ModelSignature(
    inputs=Schema(
        [
            ColSpec("string", "image"),  # a local path or base64-encoded image bytes
            ColSpec("string", "condition"),
            ColSpec("long", "target_fst"),
            ColSpec("long", "n"),
        ]
    ),
    outputs=Schema(
        [
            ColSpec("long", "row"),  # position of the input row
            ColSpec("long", "index"),
            ColSpec("string", "condition"),
            ColSpec("long", "fitzpatrick_scale"),
            ColSpec("long", "seed"),
            ColSpec("string", "image"),  # base64 PNG
        ]
    ),
)
OUTPUT_COLUMNS = [spec.name for spec in SIGNATURE.outputs.inputs]
# The most images one predict call makes, per input row (`n`) and in all: a bigger request is
# refused before anything is generated, not left running for hours (10**6 images take about a
# day on a GPU). Split a bigger table over several calls.
MAX_IMAGES_PER_ROW = 64
MAX_IMAGES_PER_CALL = 1024


@dataclass(frozen=True)
class PackagedGenerator:
    """What a generator model holds, as local files."""

    config: GenerateConfig
    embeddings_dir: Path | None
    lora_file: Path | None
    frozen_params: dict[str, str]

    @classmethod
    def from_artifacts(cls, artifacts: Mapping[str, str]) -> "PackagedGenerator":
        """From the model's artifacts (name -> local path), as pyfunc's context gives them."""
        settings = json.loads(Path(artifacts["settings"]).read_text())
        return cls(
            config=GenerateConfig(**settings),
            embeddings_dir=Path(artifacts["embeddings"]) if "embeddings" in artifacts else None,
            lora_file=Path(artifacts["lora"]) if "lora" in artifacts else None,
            frozen_params=read_frozen_params(Path(artifacts["frozen_params"])),
        )

    def weights_digest(self) -> dict[str, str]:
        """SHA-256 of each weight file: what the generated images depend on besides settings."""
        files = sorted(self.embeddings_dir.iterdir()) if self.embeddings_dir else []
        files += [self.lora_file] if self.lora_file else []
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


class GeneratorModel(mlflow.pyfunc.PythonModel):
    """pyfunc model: `predict` turns rows of (image, condition, target_fst, n) into `n` images
    each. Image seeds derive from (the model's seed, MD5 of the image bytes, index) as in the
    generate stage, so the same input gives the same images."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        generator = PackagedGenerator.from_artifacts(context.artifacts)
        # Precision is the loading machine's choice (fp16 on a GPU), like its device; the UNet
        # runs uncompiled, as requests of any size would each compile it for their shape.
        self.config = replace(generator.config, mixed_precision=Precision.AUTO, compile_unet=False)
        embeddings, lora_file = adapter_files(
            self.config, generator.embeddings_dir, generator.lora_file
        )
        self.tokens = set(embeddings.values())
        self.pipe, self.resolution = load_pipeline(self.config, embeddings, lora_file)

    def predict(
        self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame, params=None
    ) -> pd.DataFrame:
        config = self.config
        images = []
        with tempfile.TemporaryDirectory() as tmp:
            plan = self._plan(model_input, Path(tmp))
            starts = range(0, len(plan), config.generation_batch_size)
            for start in tqdm(starts, desc="generating", unit="batch"):
                chunk = plan.iloc[start : start + config.generation_batch_size]
                images += generate_batch(self.pipe, config, chunk, self.resolution)
        return plan[OUTPUT_COLUMNS[:-1]].assign(image=[_png_base64(image) for image in images])

    def _plan(self, model_input: pd.DataFrame, tmp: Path) -> pd.DataFrame:
        """One row per image to make, with its prompt, seed and source image file; every input
        row is checked first, so a bad one stops the call before anything is generated."""
        config = self.config
        counts = [int(n) for n in model_input["n"]]
        for position, count in enumerate(counts):
            if not 0 <= count <= MAX_IMAGES_PER_ROW:
                raise SkindiffError(
                    f"row {position}: n must be 0 to {MAX_IMAGES_PER_ROW} images per row, "
                    f"got {count}"
                )
        if sum(counts) > MAX_IMAGES_PER_CALL:
            raise SkindiffError(
                f"n adds up to {sum(counts)} images; one predict call makes at most "
                f"{MAX_IMAGES_PER_CALL}: split the table over several calls"
            )
        rows = []
        for position, item in enumerate(model_input.itertuples(index=False)):
            target, count = int(item.target_fst), counts[position]
            if target not in SKIN_TYPE_PHRASES:
                raise SkindiffError(f"row {position}: target_fst must be 1..6, got {target}")
            concept = placeholder_token(item.condition) if config.uses_ti else item.condition
            if config.uses_ti and concept not in self.tokens:
                raise SkindiffError(
                    f"row {position}: this generator has no token for condition "
                    f"{item.condition!r} (it has {', '.join(sorted(self.tokens))})"
                )
            data = _image_bytes(item.image, position)
            source = tmp / f"row-{position}"
            source.write_bytes(data)
            _check_image(source, item.image, position)
            md5hash = hashlib.md5(data).hexdigest()
            rows += [
                {
                    "row": position,
                    "index": k,
                    "condition": item.condition,
                    "fitzpatrick_scale": target,
                    "seed": image_seed(config.seed, md5hash, k),
                    "prompt": skin_prompt(concept, target),
                    "source_path": str(source),
                }
                for k in range(count)
            ]
        return pd.DataFrame(rows, columns=[*OUTPUT_COLUMNS[:-1], "prompt", "source_path"])


def _image_bytes(value: str, position: int) -> bytes:
    try:
        if Path(value).is_file():
            return Path(value).read_bytes()
    except OSError:
        pass  # too long for a file name: base64 text
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise SkindiffError(
            f"row {position}: image {_shown(value)} is neither an existing file nor base64 "
            "image bytes"
        ) from None


def _check_image(source: Path, value: str, position: int) -> None:
    """Refuses the input row whose image (`value`, copied to `source`) does not decode, naming
    the value given: the copy's name would mean nothing to the caller."""
    try:
        load_rgb(source)
    except Image.UnidentifiedImageError:
        raise SkindiffError(f"row {position}: image {_shown(value)} is not an image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise SkindiffError(
            f"row {position}: image {_shown(value)} cannot be decoded: {err}"
        ) from None


def _shown(value: str) -> str:
    """An input value as an error quotes it: a path whole, base64 text by its start."""
    return repr(value) if len(value) <= 80 else f"{value[:40]!r}... ({len(value)} characters)"


def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _pip_requirements() -> list[str]:
    """skindiff's declared dependencies (its code travels with the model): explicit, because
    MLflow's inference of requirements imports everything and is slow."""
    try:
        declared = requires("skindiff") or []
    except PackageNotFoundError:
        raise SkindiffError("skindiff is not installed: run `pip install -e .` first") from None
    return [requirement for requirement in declared if "extra ==" not in requirement]


def log_generator_model(
    ti_run_id: str | None,
    lora_run_id: str | None,
    config: GenerateConfig,
    frozen_params: Mapping[str, str],
) -> str:
    """Logs the generator of `config` (its mode's adapters from these runs; None for one it
    does not use) as the model `generator` of the active run; returns the model URI."""
    if mlflow.active_run() is None:
        raise SkindiffError("log_generator_model needs an active MLflow run")
    for used, run_id, stage in (
        (config.uses_ti, ti_run_id, Stage.TEXTUAL_INVERSION),
        (config.uses_lora, lora_run_id, Stage.LORA),
    ):
        if used and not run_id:
            raise SkindiffError(f"mode {config.mode} needs a {stage} run id")
    if not frozen_params:
        raise SkindiffError("frozen_params is empty: a generator records what it was tuned with")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        settings = folder / SETTINGS_FILE
        settings.write_text(json.dumps(asdict(config), indent=2))
        artifacts = {
            "settings": str(settings),
            "frozen_params": str(write_frozen_params(frozen_params, folder / FROZEN_PARAMS_FILE)),
        }
        if config.uses_ti:
            artifacts["embeddings"] = str(
                fetch_upstream(
                    ti_run_id,
                    Stage.TEXTUAL_INVERSION,
                    EMBEDDINGS_DIR,
                    config.base_model,
                    folder / "ti",
                )
            )
        if config.uses_lora:
            artifacts["lora"] = str(
                fetch_upstream(
                    lora_run_id, Stage.LORA, LORA_WEIGHTS_ARTIFACT, config.base_model, folder
                )
            )
        with warnings.catch_warnings():
            # An input example would be run through predict at logging time: a pipeline load
            # and a generation. The explicit signature documents the input instead.
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            info = mlflow.pyfunc.log_model(
                name=GENERATOR_MODEL,
                python_model=GeneratorModel(),
                artifacts=artifacts,
                signature=SIGNATURE,
                pip_requirements=_pip_requirements(),
                code_paths=[str(Path(skindiff.__file__).parent)],
                metadata={
                    KIND_KEY: GENERATOR_MODEL,
                    "base_model": config.base_model,
                    "ti_run_id": as_text(ti_run_id if config.uses_ti else None),
                    "lora_run_id": as_text(lora_run_id if config.uses_lora else None),
                },
            )
    return info.model_uri


def fetch_generator(model_uri: str, dst: Path) -> PackagedGenerator:
    """Downloads a generator model (runs:/..., models:/name@alias, ...) under `dst`."""
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    except (MlflowException, OSError) as err:
        reason = str(getattr(err, "message", err)).strip().splitlines()[0]
        raise SkindiffError(
            f"generator URI {model_uri!r} does not resolve on {mlflow.get_tracking_uri()}: {reason}"
        ) from None
    try:
        model = Model.load(local)
    except (MlflowException, OSError):
        model = None
    if model is None or (model.metadata or {}).get(KIND_KEY) != GENERATOR_MODEL:
        raise SkindiffError(f"generator URI {model_uri!r} is not a skindiff generator model")
    artifacts = model.flavors["python_function"]["artifacts"]
    return PackagedGenerator.from_artifacts(
        {name: str(local / spec["path"]) for name, spec in artifacts.items()}
    )


def generator_frozen_params(model_uri: str) -> dict[str, str]:
    """The frozen params packaged in a generator model (runs:/... or models:/name@alias)."""
    with tempfile.TemporaryDirectory() as tmp:
        return fetch_generator(model_uri, Path(tmp)).frozen_params


def register_generator(
    model_uri: str,
    registered_model: str,
    scenario: str,
    objective: str,
    value: float,
    tune_seed: int | None = None,
) -> tuple[str, bool]:
    """Registers a new version (tags scenario, objective, value and, where given, tune_seed:
    the data seed it was tuned on) and moves the alias `champion` to it when there is none yet
    or `value` beats the champion's; returns (version, whether the alias moved). A champion
    scored by another objective is not comparable: it keeps the alias, with a warning. Not
    atomic: concurrent callers may both move it."""
    if math.isnan(value):
        raise SkindiffError(f"objective value of {model_uri} is NaN: not registered")
    tags = {"scenario": scenario, "objective": objective, "value": str(float(value))}
    if tune_seed is not None:
        tags[TUNE_SEED_VERSION_TAG] = str(tune_seed)
    version = str(mlflow.register_model(model_uri, registered_model, tags=tags).version)
    client = mlflow.MlflowClient()
    champion = client.get_registered_model(registered_model).aliases.get(CHAMPION_ALIAS)
    moved = champion is None
    if champion is not None:
        champion_tags = client.get_model_version(registered_model, str(champion)).tags
        if champion_tags.get("objective", objective) != objective:
            logger.warning(
                "%s version %s (%s) is not compared with the champion, version %s, scored by "
                "%s: the alias stays; move it by hand if this version should be the champion",
                registered_model,
                version,
                objective,
                champion,
                champion_tags["objective"],
            )
        else:
            moved = value > _value_of(client, registered_model, str(champion))
    if moved:
        client.set_registered_model_alias(registered_model, CHAMPION_ALIAS, version)
    return version, moved


def _value_of(client: mlflow.MlflowClient, registered_model: str, version: str) -> float:
    """A version's `value` tag; a version without one is beaten by any value."""
    text = client.get_model_version(registered_model, version).tags.get("value", "-inf")
    try:
        return float(text)
    except ValueError:
        raise SkindiffError(
            f"{registered_model} version {version} has a value tag {text!r} that is not a number"
        ) from None
