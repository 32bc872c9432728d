"""Settings of a classifier run. Training settings are the reference code's (Adam lr 1e-3,
StepLR at a third of the epochs, 30 epochs of batch 256, 224 px crops). The arch defaults to
`tiny`, which runs offline on a CPU (the paper: vgg16); weights default to `auto`: ImageNet
weights for the paper's archs and timm's models, as the paper, and random ones for `tiny`,
which has none.

Besides the built-in archs, `timm:<model name>` is any model timm lists (`timm:convnext_tiny`,
`timm:efficientnet_b0`, or with a pretrained tag that picks its weights,
`timm:convnext_tiny.fb_in22k`). timm is imported only when such a name is parsed, so
`skindiff --help` stays fast."""

import difflib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import ClassVar

from skindiff.core.settings import Settings, check_seed, setting
from skindiff.errors import require

TIMM_PREFIX = "timm:"
ARCH_CHOICES = "vgg16, resnet18, vit_b_16, tiny or timm:<model name>"


class Arch(str):
    """A classifier architecture: a built-in one (`Arch.VGG16`, ...) or `timm:<model name>`.

    Text that is neither raises ValueError, which `core.settings.coerce` turns into a one-line
    error naming the option."""

    VGG16: ClassVar["Arch"]
    RESNET18: ClassVar["Arch"]
    VIT_B_16: ClassVar["Arch"]
    TINY: ClassVar["Arch"]  # a small CNN for CPU runs and tests

    def __new__(cls, value: str) -> "Arch":
        if isinstance(value, cls):
            return value
        text = str(value)
        if text.startswith(TIMM_PREFIX):
            problem = _timm_problem(text.removeprefix(TIMM_PREFIX))
            if problem:
                raise ValueError(f"must be one of {ARCH_CHOICES}, got {text!r}: {problem}")
        elif text not in _BUILTIN_NAMES:
            raise ValueError(f"must be one of {ARCH_CHOICES}, got {text!r}")
        return super().__new__(cls, text)

    @property
    def timm_name(self) -> str | None:
        """The timm model name of a `timm:` arch; None for a built-in one."""
        return self.removeprefix(TIMM_PREFIX) if self.startswith(TIMM_PREFIX) else None


_BUILTIN_NAMES = ("vgg16", "resnet18", "vit_b_16", "tiny")
Arch.VGG16, Arch.RESNET18, Arch.VIT_B_16, Arch.TINY = (Arch(name) for name in _BUILTIN_NAMES)
BUILTIN_ARCHS = (Arch.VGG16, Arch.RESNET18, Arch.VIT_B_16, Arch.TINY)


def _timm_problem(name: str) -> str | None:
    """Why timm cannot build the model `name` (unknown, or a pretrained tag it lacks); None
    when it can."""
    import timm  # here, not at import: only a timm arch pays for it

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        return f"timm has no model {name!r}" + (f" (close: {', '.join(close)})" if close else "")
    try:
        timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # a tag the model's pretrained configs lack
        base, tag = timm.models.split_model_name_tag(name)
        tags = ", ".join(t.removeprefix(f"{base}.") for t in timm.list_pretrained(f"{base}.*"))
        return f"timm has no pretrained tag {tag!r} for {base} (its tags: {tags or 'none'})"
    return None


PAPER_ARCHS = (Arch.VGG16, Arch.RESNET18, Arch.VIT_B_16)  # the archs of the paper's Tables 2-4
# Built-in architectures whose input size is fixed by their position embeddings.
FIXED_INPUT_SIZE = {Arch.VIT_B_16: 224}
MIN_IMAGE_SIZE = 32


def fixed_input_size(arch: Arch) -> int | None:
    """The only image size `arch` takes; None where any (from MIN_IMAGE_SIZE) will do. A timm
    model's is its pretrained config's input size where that config says it is fixed (ViTs and
    other models with position embeddings)."""
    if arch.timm_name is None:
        return FIXED_INPUT_SIZE.get(arch)
    from skindiff.classify.timm_backbones import pretrained_config  # imports timm

    config = pretrained_config(arch.timm_name)
    return config.input_size[-1] if config.fixed_input_size else None


class Weights(StrEnum):
    """Where a classifier's starting weights come from, besides a checkpoint file."""

    AUTO = "auto"  # imagenet for the paper's archs and timm's, none for tiny (resolve_weights)
    NONE = "none"  # random initialisation
    # torchvision's IMAGENET1K_V1 from the local torch cache only; a timm model's pretrained
    # weights from timm's local cache only
    IMAGENET = "imagenet"


def resolve_weights(arch: Arch, weights: Weights | Path) -> Weights | Path:
    """`weights` with `auto` replaced by what it means for `arch`: imagenet or none."""
    if weights != Weights.AUTO:
        return weights
    return Weights.NONE if arch == Arch.TINY else Weights.IMAGENET


class Selection(StrEnum):
    """Which epoch's weights a classifier keeps."""

    VAL = "val"  # the best validation macro-F1 (the earlier on ties)
    LAST = "last"  # the last epoch; needs no validation split
    # The reference code's rule, on the test split (optimistic): the lowest test loss among
    # epochs 12 and later below epoch 11's, else the initial weights (classify.train).
    TEST = "test"


class Finetune(StrEnum):
    HEAD = "head"  # frozen backbone, new head (the reference)
    FULL = "full"  # train everything


class TrainType(StrEnum):
    """The images a classifier trains on."""

    REAL = "real"
    SYN = "syn"
    REAL_SYN = "real+syn"


@dataclass(frozen=True)
class ClassifierConfig(Settings):
    """Settings of a classifier run (see the module docstring)."""

    arch: Arch = setting(
        Arch.TINY,
        "Classifier: vgg16, resnet18, vit_b_16, tiny (a small CNN for CPU runs), or "
        "timm:<model name>, any model timm lists (timm:convnext_tiny, timm:efficientnet_b0; "
        "a pretrained tag picks its weights: timm:convnext_tiny.fb_in22k).",
    )
    weights: Weights | Path = setting(
        Weights.AUTO,
        "auto (imagenet for vgg16, resnet18, vit_b_16 and timm:<name>; none for tiny), "
        "imagenet (torchvision's from the local torch hub cache, timm's from timm's local "
        "cache; never downloaded), none (random), or a checkpoint file.",
    )
    finetune: Finetune = setting(
        Finetune.HEAD, "head: frozen backbone, new head (reference); full: train everything."
    )
    train_type: TrainType = setting(
        TrainType.REAL, "real, syn or real+syn: the images the classifier trains on."
    )
    epochs: int = setting(30, "Classifier: training epochs; selection picks the one kept.")
    batch_size: int = setting(256, "Classifier: images per batch.")
    learning_rate: float = setting(
        1e-3, "Classifier: Adam learning rate (StepLR divides it by 10 every epochs // 3)."
    )
    image_size: int = setting(
        224,
        "Classifier: input crop in pixels (ViT-B-16 needs 224, a timm model with a fixed input "
        "size its own).",
    )
    seed: int = setting(0, "Seed of the classifier's initialisation and sampling.")
    selection: Selection = setting(
        Selection.VAL,
        "The epoch whose weights are kept: val (best validation macro-F1), last (needs no "
        "validation split) or test (the reference code's optimistic rule: the lowest test loss "
        "among epochs 12 and later that is below epoch 11's, else the initial weights).",
    )

    def check(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            require(value >= 1, f"{name} must be at least 1, got {value}")
        require(
            self.image_size >= MIN_IMAGE_SIZE,
            f"image_size must be at least {MIN_IMAGE_SIZE}, got {self.image_size}",
        )
        fixed = fixed_input_size(self.arch)
        require(
            fixed is None or self.image_size == fixed,
            f"image_size must be {fixed} for arch {self.arch}, got {self.image_size}",
        )
        require(self.learning_rate > 0, f"learning_rate must be positive, got {self.learning_rate}")
        check_seed("seed", self.seed)
        require(
            not isinstance(self.weights, Path) or bool(self.weights.name),
            f"weights must be auto, none, imagenet or a checkpoint path, got {str(self.weights)!r}",
        )
        require(
            not (self.weights == Weights.IMAGENET and self.arch == Arch.TINY),
            "weights='imagenet': arch 'tiny' has no ImageNet weights; use weights='none' or "
            "the path of a checkpoint",
        )

    @property
    def resolved_weights(self) -> Weights | Path:
        """The weights this classifier starts from: imagenet, none or a checkpoint path."""
        return resolve_weights(self.arch, self.weights)


def require_validation(selection: Selection, has_val: bool, why: str) -> None:
    """Refuses selection on a validation split that there is not (`why`: what is missing)."""
    require(
        selection != Selection.VAL or has_val,
        f"selection 'val' chooses the epoch on the validation split, but {why}: prepare the "
        "data with --val-fraction > 0, or use --selection last (or test)",
    )
