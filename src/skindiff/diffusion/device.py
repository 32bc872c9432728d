"""Where diffusion work runs and at which precision."""

import torch

from skindiff.errors import SkindiffError

PRECISIONS = ("auto", "no", "fp16", "bf16")


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_mixed_precision(mixed_precision: str) -> str:
    """`auto` is fp16 on a GPU (the reference setting) and full precision on a CPU."""
    if mixed_precision not in PRECISIONS:
        raise SkindiffError(
            f"mixed_precision must be one of {', '.join(PRECISIONS)}, got {mixed_precision!r}"
        )
    if mixed_precision == "auto":
        return "fp16" if torch.cuda.is_available() else "no"
    if mixed_precision != "no" and not torch.cuda.is_available():
        raise SkindiffError(f"mixed_precision={mixed_precision} needs a GPU; use 'no' or 'auto'")
    return mixed_precision


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """dtype for frozen weights under a resolved mixed-precision setting."""
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]
