"""Where work runs and at which precision."""

from collections.abc import Iterable

import torch

from skindiff.core.settings import Precision
from skindiff.errors import SkindiffError


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_mixed_precision(mixed_precision: Precision) -> Precision:
    """`auto` is fp16 on a GPU (the reference setting) and full precision on a CPU. bf16 runs on
    a CPU too (torch's CPU autocast computes in bfloat16), so the mixed-precision code runs
    before a GPU does; fp16 needs a GPU."""
    if mixed_precision == Precision.AUTO:
        return Precision.FP16 if torch.cuda.is_available() else Precision.NO
    if mixed_precision == Precision.FP16 and not torch.cuda.is_available():
        raise SkindiffError("mixed_precision fp16 needs a GPU; on a CPU use bf16 or no")
    return Precision(mixed_precision)


def non_finite_remedy(precision: Precision, full_precision_hint: str) -> str:
    """The end of a one-line error about a NaN or inf made under the resolved `precision`: the
    setting to change, or, under full precision (where rounding is not the cause),
    `full_precision_hint`."""
    if precision == Precision.FP16:
        # bf16 has float32's range (fp16 overflows above 65504); offered where the GPU has it.
        native_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported(
            including_emulation=False
        )
        other = "bf16 (or no)" if native_bf16 else "no"
        return f"under mixed_precision fp16: run again with --mixed-precision {other}"
    if precision == Precision.BF16:
        return "under mixed_precision bf16: run again with --mixed-precision no"
    return f"under full precision: {full_precision_hint}"


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
