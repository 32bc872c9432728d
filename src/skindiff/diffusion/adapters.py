"""The adapter files the generator stages exchange, in diffusers' formats.

- Textual Inversion: one `<token-without-brackets>.safetensors` per token holding
  `{token: tensor[num_vectors, dim]}`, which a stock pipeline's `load_textual_inversion` reads;
- LoRA: `pytorch_lora_weights.safetensors`, the name `load_lora_weights` looks for.
"""

from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

from skindiff.core.library_logs import LibraryMessage, without_messages
from skindiff.errors import SkindiffError, require

if TYPE_CHECKING:  # the file names and checks here are needed without torch (tracking, CLI)
    import torch
    from diffusers import StableDiffusionPipeline

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
# transformers' note, as load_textual_inversion grows the text encoder's vocabulary, that the
# new rows start from the old ones' mean and covariance: the loaded embeddings overwrite them
# at once.
NEW_EMBEDDINGS_NOTE = LibraryMessage(
    "transformers.modeling_utils", "The new embeddings will be initialized from"
)
# diffusers' note that a LoRA file has no weights for the text encoder: dropped for a file of
# UNet weights only (as skindiff's), where none were meant. It shows for any other file (one
# made for another text encoder), as does the note on a file without UNet weights.
NO_TEXT_ENCODER_LORA = LibraryMessage(
    "diffusers.loaders.lora_base", "No LoRA keys associated to CLIPTextModel"
)


def token_file_name(token: str) -> str:
    """File of a token's embedding: `<psoriasis>` -> `psoriasis.safetensors`."""
    return token.strip("<>") + ".safetensors"


def embedding_files(embeddings_dir: Path | None, tokens: Collection[str] = ()) -> dict[Path, str]:
    """Each embedding file of `embeddings_dir` with the token it holds; each of `tokens` must
    be among them."""
    require(
        embeddings_dir is not None and Path(embeddings_dir).is_dir(),
        f"embeddings_dir {embeddings_dir} is not a folder of embeddings",
    )
    paths = sorted(Path(embeddings_dir).glob("*.safetensors"))
    require(bool(paths), f"embeddings_dir {embeddings_dir} holds no *.safetensors embeddings")
    files = {}
    for path in paths:
        try:
            with safe_open(path, "pt") as handle:
                keys = list(handle.keys())
        except (OSError, SafetensorError) as err:
            raise SkindiffError(f"embedding file {path} is not readable: {err}") from None
        require(
            len(keys) == 1,
            f"embedding file {path} is not a diffusers Textual Inversion file (one key = the "
            f"token); it holds {keys}",
        )
        files[path] = keys[0]
    missing = sorted(set(tokens) - set(files.values()))
    require(
        not missing, f"embeddings_dir {embeddings_dir} has no embedding for {', '.join(missing)}"
    )
    return files


def read_embeddings(embeddings_dir: Path) -> "dict[str, torch.Tensor]":
    """`{token: tensor}` of every embedding file in `embeddings_dir`."""
    embeddings = {}
    for path, token in embedding_files(embeddings_dir).items():
        with safe_open(path, "pt") as handle:
            embeddings[token] = handle.get_tensor(token)
    return embeddings


def embedding_width(path: Path) -> int:
    """The vector size of an embedding file (the text encoder width it was trained for)."""
    with safe_open(path, "pt") as handle:
        return handle.get_slice(handle.keys()[0]).get_shape()[-1]


def lora_weights_file(lora_weights: Path | None) -> Path:
    """The LoRA weight file: `lora_weights` itself, or the LORA_WEIGHTS_FILE in that folder."""
    path = Path(lora_weights) if lora_weights is not None else None
    if path is not None and path.is_dir():
        path = path / LORA_WEIGHTS_FILE
    require(
        path is not None and path.is_file(),
        f"lora_weights {path} not found (a {LORA_WEIGHTS_FILE} or its folder)",
    )
    return path


def load_token_embeddings(
    pipeline: "StableDiffusionPipeline", embeddings: "list[str] | list[dict[str, torch.Tensor]]"
) -> None:
    """The pipeline's `load_textual_inversion(embeddings)` (files, or `{token: tensor}`s),
    without NEW_EMBEDDINGS_NOTE."""
    with without_messages(NEW_EMBEDDINGS_NOTE):
        pipeline.load_textual_inversion(embeddings)


def load_lora(pipeline: "StableDiffusionPipeline", path: Path) -> None:
    """The pipeline's `load_lora_weights(path)`, without NO_TEXT_ENCODER_LORA where the file
    holds UNet weights only."""
    try:
        with safe_open(path, "pt") as handle:
            keys = handle.keys()
    except (OSError, SafetensorError) as err:
        raise SkindiffError(f"lora_weights {path} is not readable: {err}") from None
    dropped = [NO_TEXT_ENCODER_LORA] if all(key.startswith("unet.") for key in keys) else []
    with without_messages(*dropped):
        pipeline.load_lora_weights(str(path))
