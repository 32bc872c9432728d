"""Settings of a classifier run. Training settings are the reference code's (Adam lr 1e-3,
StepLR at a third of the epochs, 30 epochs of batch 256, 224 px crops). The arch defaults to
`tiny`, which runs offline on a CPU (the paper: vgg16); weights default to `auto`: ImageNet
weights for the paper's archs, as the paper, and random ones for `tiny`, which has none."""

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from skindiff.core.settings import Settings, check_seed, setting
from skindiff.errors import require


class Arch(StrEnum):
    VGG16 = "vgg16"
    RESNET18 = "resnet18"
    VIT_B_16 = "vit_b_16"
    TINY = "tiny"  # a small CNN for CPU runs and tests


PAPER_ARCHS = (Arch.VGG16, Arch.RESNET18, Arch.VIT_B_16)  # the archs of the paper's Tables 2-4
# Architectures whose input size is fixed by their position embeddings.
FIXED_INPUT_SIZE = {Arch.VIT_B_16: 224}
MIN_IMAGE_SIZE = 32


class Weights(StrEnum):
    """Where a classifier's starting weights come from, besides a checkpoint file."""

    AUTO = "auto"  # imagenet for the paper's archs, none for tiny (see resolve_weights)
    NONE = "none"  # random initialisation
    IMAGENET = "imagenet"  # torchvision's IMAGENET1K_V1, from the local torch cache only


def resolve_weights(arch: Arch, weights: Weights | Path) -> Weights | Path:
    """`weights` with `auto` replaced by what it means for `arch`: imagenet or none."""
    if weights != Weights.AUTO:
        return weights
    return Weights.NONE if arch == Arch.TINY else Weights.IMAGENET


class Selection(StrEnum):
    """Which epoch's weights a classifier keeps."""

    VAL = "val"  # the best validation macro-F1 (the earlier on ties)
    LAST = "last"  # the last epoch; needs no validation split
    TEST = "test"  # the best test macro-F1: the reference code's protocol, optimistic


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
        Arch.TINY, "Classifier: vgg16, resnet18, vit_b_16 or tiny (a small CNN for CPU runs)."
    )
    weights: Weights | Path = setting(
        Weights.AUTO,
        "auto (imagenet for vgg16, resnet18, vit_b_16; none for tiny), imagenet (from the "
        "local torch hub cache, never downloaded), none (random), or a checkpoint file.",
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
    image_size: int = setting(224, "Classifier: input crop in pixels (ViT-B-16 needs 224).")
    seed: int = setting(0, "Seed of the classifier's initialisation and sampling.")
    selection: Selection = setting(
        Selection.VAL,
        "The epoch whose weights are kept: val (best validation macro-F1), last (needs no "
        "validation split) or test (best test macro-F1, the reference code's optimistic "
        "protocol).",
    )

    def check(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            require(value >= 1, f"{name} must be at least 1, got {value}")
        require(
            self.image_size >= MIN_IMAGE_SIZE,
            f"image_size must be at least {MIN_IMAGE_SIZE}, got {self.image_size}",
        )
        fixed = FIXED_INPUT_SIZE.get(self.arch)
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
