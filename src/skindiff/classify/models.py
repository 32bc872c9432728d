"""Classifier networks: torchvision's VGG-16, ResNet-18 and ViT-B/16, any timm model
(`timm:<model name>`, see `classify.timm_backbones`), and a tiny CNN for tests.

Every network gets the reference code's new head in place of its last layer (for a timm model:
after its pooled features, timm's classifier removed):
Linear(in, 256)-ReLU-Dropout(0.4)-Linear(256, num_classes). The head returns logits and training
uses CrossEntropyLoss, which equals the reference's LogSoftmax + NLLLoss.

With finetune="head" the backbone's parameters are frozen, but its BatchNorm layers (ResNet-18,
tiny, many timm models) still update their running statistics in train mode, as in
torchvision's usual fine-tuning recipe; VGG-16, the reference's network, has none.

Every network takes the same ImageNet-normalised images (`classify.data`); a timm model whose
pretrained weights expect another normalisation (mean = std = 0.5 for many of timm's ViTs,
CLIP's statistics, ...) re-normalises them first, inside the network, so a logged classifier
needs no other preprocessing. Image sizes follow the classifier's `image_size` for every arch
(the reference's 224 px crops by default), except where timm's config fixes a model's size.
"""

from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors.torch import load_file
from torch import nn
from torchvision import models

from skindiff.classify.config import Arch, Finetune, Weights, resolve_weights
from skindiff.classify.data import IMAGENET_MEAN, IMAGENET_STD
from skindiff.core.settings import coerce
from skindiff.errors import SkindiffError

HEAD_HIDDEN = 256
HEAD_DROPOUT = 0.4

# The module each architecture's new head replaces.
_LAST_LAYER = {
    Arch.VGG16: "classifier.6",
    Arch.RESNET18: "fc",
    Arch.VIT_B_16: "heads.head",
    Arch.TINY: "fc",
}
_TORCHVISION: dict[Arch, tuple[Callable[[], nn.Module], models.WeightsEnum]] = {
    Arch.VGG16: (models.vgg16, models.VGG16_Weights.IMAGENET1K_V1),
    Arch.RESNET18: (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
    Arch.VIT_B_16: (models.vit_b_16, models.ViT_B_16_Weights.IMAGENET1K_V1),
}


STEM_SIZE = 64


class TinyCNN(nn.Module):
    """Four conv-BN-ReLU-max-pool blocks, global pooling and a linear layer `fc`: learns the demo
    data in seconds on a CPU, which is all the tests need. Convolutions run at full resolution
    before each pooling; strided convolutions instead learned the demo's thin patterns poorly.
    Inputs are first averaged down to at most 64 x 64, so the reference 224 px crops cost about
    what 64 px ones do."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        blocks: list[nn.Module] = []
        for c_in, c_out in ((3, 16), (16, 32), (32, 64), (64, 128)):
            blocks += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.input_size = STEM_SIZE
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > self.input_size or x.shape[-2] > self.input_size:
            x = nn.functional.adaptive_avg_pool2d(x, self.input_size)
        return self.fc(self.features(x))


class TimmClassifier(nn.Module):
    """A timm model without its classifier (`backbone`, pooled features) and the reference
    `head`; ImageNet-normalised inputs are re-normalised to the backbone's pretrained
    `mean` and `std` first (an identity where they are ImageNet's)."""

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ):
        super().__init__()
        self.backbone = backbone
        self.head = head
        given_mean, given_std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        wanted_mean, wanted_std = torch.tensor(mean), torch.tensor(std)
        scale = (given_std / wanted_std).view(-1, 1, 1)
        shift = ((given_mean - wanted_mean) / wanted_std).view(-1, 1, 1)
        # Not in the state_dict: a checkpoint's keys are those of the backbone and the head.
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("shift", shift, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x * self.scale + self.shift))


def _reference_head(in_features: int, num_classes: int) -> nn.Sequential:
    """The reference code's head: Linear(in, 256)-ReLU-Dropout(0.4)-Linear(256, num_classes)."""
    return nn.Sequential(
        nn.Linear(in_features, HEAD_HIDDEN),
        nn.ReLU(inplace=True),
        nn.Dropout(HEAD_DROPOUT),
        nn.Linear(HEAD_HIDDEN, num_classes),
    )


def build_classifier(
    arch: Arch | str,
    num_classes: int,
    weights: Weights | Path | str = Weights.NONE,
    finetune: Finetune | str = Finetune.HEAD,
) -> nn.Module:
    """A classifier with the reference head for `num_classes` classes.

    weights: none (random init), imagenet (torchvision's IMAGENET1K_V1, read from the local
    torch hub cache only; a timm model's pretrained weights, from timm's local cache only),
    auto (imagenet, none for tiny) or the path of a local state_dict (.pt, .pth or
    .safetensors) either of the plain architecture (ImageNet-shaped last layer; for a timm
    model, as timm builds it) or of a classifier built here.
    finetune: head freezes everything but the new head (the reference); full trains all.
    """
    arch = coerce(Arch, "arch", arch)
    weights = resolve_weights(arch, coerce(Weights | Path, "weights", weights))
    finetune = coerce(Finetune, "finetune", finetune)
    if num_classes < 2:
        raise SkindiffError(f"num_classes must be at least 2, got {num_classes}")
    if arch.timm_name is not None:
        return _timm_classifier(arch, num_classes, weights, finetune)
    state, source = _requested_state(arch, weights)
    model = TinyCNN() if arch == Arch.TINY else _TORCHVISION[arch][0]()
    # A state_dict of the plain architecture loads before the head is swapped, one of a
    # classifier built here after.
    plain = state is not None and state.keys() == model.state_dict().keys()
    if plain:
        _load(model, state, source, arch)
    if finetune == Finetune.HEAD:
        model.requires_grad_(False)
    last = model.get_submodule(_LAST_LAYER[arch])
    model.set_submodule(_LAST_LAYER[arch], _reference_head(last.in_features, num_classes))
    if state is not None and not plain:
        _load(model, state, source, arch)
    return model


def _timm_classifier(
    arch: Arch, num_classes: int, weights: Weights | Path, finetune: Finetune
) -> TimmClassifier:
    """build_classifier for a timm arch: a state_dict of a classifier built here loads into
    the classifier; timm's pretrained weights, or a state_dict of the model as timm builds it,
    load through timm's pretrained loader."""
    from skindiff.classify import timm_backbones  # imports timm: only timm archs pay for it

    name = arch.timm_name
    pretrained = None
    if weights == Weights.IMAGENET:
        require_imagenet_files([arch], weights)
        pretrained = timm_backbones.cached_weights(name)

    def classifier(weights_file: Path | None) -> TimmClassifier:
        backbone = timm_backbones.create_backbone(name, weights_file)
        if finetune == Finetune.HEAD:
            backbone.requires_grad_(False)
        head = _reference_head(backbone.num_features, num_classes)
        return TimmClassifier(backbone, head, *timm_backbones.normalisation(name))

    model = classifier(pretrained)
    if isinstance(weights, Path):
        path = weights.expanduser()
        state = _read_state_dict(path)
        if state.keys() == model.state_dict().keys():
            _load(model, state, str(weights), arch)
        else:  # the plain timm model's weights
            model = classifier(path)
    return model


def _requested_state(
    arch: Arch, weights: Weights | Path
) -> tuple[dict[str, torch.Tensor] | None, str]:
    """(state_dict, where it came from) for `weights`; (None, "") for random init."""
    if weights == Weights.NONE:
        return None, ""
    if isinstance(weights, Path):
        return _read_state_dict(weights.expanduser()), str(weights)
    if arch not in _TORCHVISION:
        raise SkindiffError(
            f"weights='imagenet': arch {arch!r} has no ImageNet weights; "
            "use weights='none' or the path of a checkpoint"
        )
    require_imagenet_files([arch], weights)
    return _read_state_dict(imagenet_file(arch)), str(imagenet_file(arch))


def imagenet_file(arch: Arch) -> Path:
    """Where torchvision keeps `arch`'s IMAGENET1K_V1 weights: the torch hub checkpoints folder
    (TORCH_HOME/hub/checkpoints, by default ~/.cache/torch/hub/checkpoints)."""
    url = _TORCHVISION[arch][1].url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def require_imagenet_files(archs: Iterable[Arch | str], weights: Weights | Path | str) -> None:
    """Raises one SkindiffError naming every ImageNet weight file that classifiers of `archs`
    with `weights` need and the torch hub cache (timm's cache, for timm archs) lacks, and how
    to fetch them: nothing is ever downloaded here, and a pipeline should stop before it
    trains anything, not at its first VGG-16 hours later."""
    weights = coerce(Weights | Path, "weights", weights)
    wanted = [
        arch
        for arch in dict.fromkeys(coerce(Arch, "arch", a) for a in archs)
        if resolve_weights(arch, weights) == Weights.IMAGENET
    ]
    missing = [a for a in wanted if a in _TORCHVISION and not imagenet_file(a).is_file()]
    problems, fixes = [], []
    if missing:
        folder = imagenet_file(missing[0]).parent
        names = ", ".join(f"{imagenet_file(arch).name} ({arch})" for arch in missing)
        calls = "; ".join(
            f"torchvision.models.{builder.__name__}(weights='{enum.name}')"
            for builder, enum in (_TORCHVISION[arch] for arch in missing)
        )
        urls = " ".join(_TORCHVISION[arch][1].url for arch in missing)
        problems.append(f"ImageNet weight files missing from the torch hub cache {folder}: {names}")
        fixes.append(
            f'on a machine with internet run python -c "import torchvision; {calls}" and copy '
            f"the files from its torch hub checkpoints folder into {folder} (or download {urls} "
            "there, or set TORCH_HOME to where they are)"
        )
    timm_names = [arch.timm_name for arch in wanted if arch.timm_name is not None]
    if timm_names:
        from skindiff.classify import timm_backbones  # imports timm: only timm archs pay for it

        uncached = [name for name in timm_names if timm_backbones.cached_weights(name) is None]
        if uncached:
            problem, fix = timm_backbones.missing_weights(uncached)
            problems.append(problem)
            fixes.append(fix)
    if problems:
        raise SkindiffError(
            f"weights {weights}: {'; '.join(problems)}. Nothing is downloaded here: "
            f"{'; '.join(fixes)}, or use --weights none"
        )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file or of a torch-saved state_dict (.pt, .pth)."""
    if not path.is_file():
        raise SkindiffError(f"weights: checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and safetensors errors have no common base class
        raise SkindiffError(f"weights: cannot read {path} as a state_dict: {err}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SkindiffError(f"weights: {path} holds no state_dict (a mapping of names to tensors)")
    return state


def _load(model: nn.Module, state: dict[str, torch.Tensor], source: str, arch: str) -> None:
    """load_state_dict, with a one-line description of what does not fit instead of torch's."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{len(found)} {what} (e.g. {found[0]})"
        for what, found in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", reshaped),
        )
        if found
    ]
    if problems:
        raise SkindiffError(
            f"weights: {source} fits neither {arch} nor this classifier: {'; '.join(problems)}"
        )
    model.load_state_dict(state)
