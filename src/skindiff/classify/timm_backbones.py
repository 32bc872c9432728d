"""timm models as classifier backbones (`arch timm:<model name>`), and their pretrained weights
from local files only.

A backbone is timm's model without its classifier (`reset_classifier(0)`): it returns pooled
features, `num_features` wide, for the reference head that `classify.models` puts after it.

Pretrained weights (`weights imagenet`) come from timm's own cache and are never downloaded:
the Hugging Face hub cache (HF_HUB_CACHE, by default ~/.cache/huggingface/hub), where timm
downloads them, or for the few models timm still fetches by URL, the torch hub checkpoints
folder. The file found there, or a file given as `weights <path>`, is loaded by timm's own
pretrained loader (`pretrained_cfg_overlay=dict(file=...)`), with the model's checkpoint filter,
strictly. Without them a pipeline stops before it trains anything, with one line per missing
set of weights saying how to fetch them (`classify.models.require_imagenet_files`).
"""

from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub
import timm
import torch
from torch import nn

from skindiff.errors import SkindiffError

# The safetensors file timm reads in place of a hub repo's .bin weights, when the repo has one
# (timm.models._hub.load_state_dict_from_hf).
_SAFE_NAMES = {
    "pytorch_model.bin": "model.safetensors",
    "open_clip_pytorch_model.bin": "open_clip_model.safetensors",
}


def pretrained_config(name: str) -> timm.models.PretrainedCfg:
    """timm's pretrained config of the model `name` (its default tag where `name` has none)."""
    return timm.models.get_pretrained_cfg(name)


def normalisation(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the inputs the model `name`'s pretrained weights were trained on."""
    config = pretrained_config(name)
    return tuple(config.mean), tuple(config.std)


def _hub_repo(config: timm.models.PretrainedCfg) -> tuple[str, str | None]:
    """(repo id, revision) of the hub weights of a pretrained config (`org/repo@revision`)."""
    repo, _, revision = config.hf_hub_id.partition("@")
    return repo, revision or None


def _hub_filenames(config: timm.models.PretrainedCfg) -> tuple[str, ...]:
    """The files of its hub repo timm would read, in its order: safetensors first."""
    filename = config.hf_hub_filename or "pytorch_model.bin"
    if not filename.endswith(".bin"):
        return (filename,)
    return _SAFE_NAMES.get(filename, filename.removesuffix(".bin") + ".safetensors"), filename


def _url_file(config: timm.models.PretrainedCfg) -> Path:
    """Where timm's URL download keeps a file: the torch hub checkpoints folder."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(config.url).path).name


def cached_weights(name: str) -> Path | None:
    """The file of timm's cache that holds the pretrained weights of the model `name`; None
    where the cache lacks it (or timm has no pretrained weights for it)."""
    config = pretrained_config(name)
    if config.hf_hub_id:
        repo, revision = _hub_repo(config)
        for filename in _hub_filenames(config):
            found = huggingface_hub.try_to_load_from_cache(repo, filename, revision=revision)
            if isinstance(found, str):  # not None, nor the marker of a file known to be absent
                return Path(found)
    if config.url and _url_file(config).is_file():
        return _url_file(config)
    return None


def missing_weights(names: list[str]) -> tuple[str, str]:
    """(what is missing, how to fetch it) for the models `names`, whose pretrained weights
    timm's cache lacks: the two halves of a one-line error."""
    hub_cache = huggingface_hub.constants.HF_HUB_CACHE
    places, calls = [], []
    for name in names:
        config = pretrained_config(name)
        if config.hf_hub_id:
            repo = _hub_repo(config)[0]
            places.append(f"timm:{name} (models--{repo.replace('/', '--')} in {hub_cache})")
        elif config.url:
            places.append(f"timm:{name} ({_url_file(config)})")
        else:
            places.append(f"timm:{name} (timm has no pretrained weights for it)")
            continue
        calls.append(f"timm.create_model('{name}', pretrained=True)")
    problem = "timm's pretrained weights missing from its local cache: " + ", ".join(places)
    fix = "give a local weights file as --weights <path>"
    if calls:
        fix = (
            f'on a machine with internet run python -c "import timm; {"; ".join(calls)}" and '
            "copy what it downloads into the same folders here (or set HF_HUB_CACHE, or TORCH_HOME "
            f"for a checkpoints file, to where they are), or {fix}"
        )
    return problem, fix


def create_backbone(name: str, weights_file: Path | None) -> nn.Module:
    """timm's model `name` without its classifier: random, or with the weights of
    `weights_file` (timm's pretrained weights, or a state_dict of the model as timm builds it,
    its classifier included) loaded by timm's pretrained loader, strictly."""
    if weights_file is None:
        model = timm.create_model(name)
    else:
        try:
            model = timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay={"file": str(weights_file)}
            )
        except Exception as err:  # the loaders raise RuntimeError, KeyError, pickle errors...
            detail = " ".join(str(err).split())
            raise SkindiffError(
                f"weights: {weights_file} does not fit timm:{name}: "
                f"{detail[:300]}{'...' if len(detail) > 300 else ''}"
            ) from None
    model.reset_classifier(0)
    return model
