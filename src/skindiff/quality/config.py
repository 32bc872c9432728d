"""Settings of the `synthetic_quality` stage."""

from dataclasses import dataclass
from enum import StrEnum

from skindiff.core.settings import Settings, setting
from skindiff.errors import require


class QualityFeatures(StrEnum):
    """The network whose features the measures compare; every metric name carries it."""

    AUTO = "auto"  # an ImageNet backbone whose weights file is present, else classifier
    INCEPTION = "inception"  # the Fréchet distance's usual network (its weights file)
    RESNET18 = "resnet18"
    VGG16 = "vgg16"
    VIT_B_16 = "vit_b_16"
    CLASSIFIER = "classifier"  # the scenario's `real` classifier, before its class scores


IMAGENET_FEATURES = (QualityFeatures.RESNET18, QualityFeatures.VGG16, QualityFeatures.VIT_B_16)


@dataclass(frozen=True)
class QualityConfig(Settings):
    """What `synthetic_quality` measures with."""

    quality_features: QualityFeatures = setting(
        QualityFeatures.AUTO,
        "Features the measures compare: inception (FID's network, torch-fidelity's weights "
        "file in the torch hub cache), resnet18, vgg16, vit_b_16 (ImageNet weights from the "
        "local torch hub cache, as the classifiers'), classifier (the scenario's real "
        "classifier, found or trained with the classifier options), or auto (the first "
        "ImageNet backbone whose weights file is present, else classifier).",
    )
    memorization_threshold: float = setting(
        0.95,
        "A synthetic image whose features' cosine similarity to a training image other than "
        "its source reaches this counts as memorized.",
    )
    nearest_k: int = setting(5, "Neighbours of precision, recall, density and coverage.")
    quality_batch_size: int = setting(64, "Images per batch through the feature network.")

    def check(self) -> None:
        require(
            -1 <= self.memorization_threshold <= 1,
            f"memorization_threshold must lie in [-1, 1], got {self.memorization_threshold}",
        )
        require(self.nearest_k >= 1, f"nearest_k must be at least 1, got {self.nearest_k}")
        require(
            self.quality_batch_size >= 1,
            f"quality_batch_size must be at least 1, got {self.quality_batch_size}",
        )
