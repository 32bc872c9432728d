"""Where work runs and at which precision."""

from collections.abc import Iterable

import torch

from skindiff.core.settings import Precision
from skindiff.errors import SkindiffError


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_mixed_precision(mixed_precision: Precision) -> Precision:
    """`auto` is fp16 on a GPU (the reference setting) and full precision on a CPU."""
    if mixed_precision == Precision.AUTO:
        return Precision.FP16 if torch.cuda.is_available() else Precision.NO
    if mixed_precision != Precision.NO and not torch.cuda.is_available():
        raise SkindiffError(f"mixed_precision={mixed_precision} needs a GPU; use 'no' or 'auto'")
    return Precision(mixed_precision)


def weight_dtype(mixed_precision: Precision) -> torch.dtype:
    """dtype for frozen weights under a resolved mixed-precision setting."""
    return {
        Precision.NO: torch.float32,
        Precision.FP16: torch.float16,
        Precision.BF16: torch.bfloat16,
    }[mixed_precision]


def fused_adam(params: Iterable[torch.Tensor]) -> bool:
    """Whether torch's fused Adam / AdamW (one kernel per step for all parameters, instead of a
    dozen operations per parameter: 1.5 of a tiny LoRA step's 30 ms on a CPU) can update
    `params`, which it can on a CPU and a GPU. Its updates equal the unfused ones to float
    rounding."""
    return all(p.device.type in ("cpu", "cuda") for p in params)
