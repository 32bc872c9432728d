"""One name per setting: config field <-> CLI option <-> MLproject parameter <-> MLflow param.

A stage's settings are fields of config dataclasses. Each dataclass is an OptionGroup whose
fields become options named `prefix + field` (`TextualInversionConfig.learning_rate` is
`ti_learning_rate`). Fields every diffusion stage shares (seed, conditions, base model, ...)
are one option each, not one per config.
"""

import typing
from collections.abc import Iterable, Mapping
from dataclasses import Field, dataclass, fields, replace
from typing import Any

from skindiff.classify.train import ClassifierConfig
from skindiff.data.prepare import PrepareConfig
from skindiff.diffusion.generate import GenerateConfig
from skindiff.diffusion.lora import LoraConfig
from skindiff.diffusion.textual_inversion import TextualInversionConfig
from skindiff.errors import SkindiffError


@dataclass(frozen=True)
class ModelOptions:
    """Options every diffusion stage shares."""

    base_model: str = "tiny"
    resolution: int = 0
    mixed_precision: str = "auto"


@dataclass(frozen=True)
class OptionGroup:
    """The fields of one config dataclass as options named `prefix + field`. Fields in `shared`
    take the value of the unprefixed option of that name; fields in `omit` keep their default.
    `defaults` ((field, value) pairs) replace the config's defaults, for a command whose
    protocol differs (the ablation's VGG-16)."""

    config: type
    prefix: str = ""
    shared: tuple[str, ...] = ()
    omit: tuple[str, ...] = ()
    defaults: tuple[tuple[str, Any], ...] = ()

    def default(self, field: Field) -> Any:
        return dict(self.defaults).get(field.name, field.default)

    def option_fields(self) -> Iterable[tuple[str, Any, Any]]:
        """(option name, field type, default) of the fields that are options of this group."""
        hints = typing.get_type_hints(self.config)
        for field in fields(self.config):
            if field.name not in self.shared + self.omit:
                yield self.prefix + field.name, hints[field.name], self.default(field)


# Fields a diffusion config takes from the data and model options.
_SHARED = ("seed", "conditions", "base_model", "resolution", "mixed_precision")
DATA = OptionGroup(PrepareConfig)
MODEL = OptionGroup(ModelOptions)
TEXTUAL_INVERSION = OptionGroup(TextualInversionConfig, "ti_", shared=_SHARED)
LORA = OptionGroup(LoraConfig, "lora_", shared=_SHARED[:1] + _SHARED[2:])
GENERATE = OptionGroup(GenerateConfig, shared=_SHARED[:1] + _SHARED[2:])
CLASSIFIER = OptionGroup(ClassifierConfig, shared=("seed",))


def comma_list(text: str) -> tuple[str, ...]:
    """'a, b,c' -> ('a', 'b', 'c')."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def int_list(text: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(item) for item in comma_list(text))
    except ValueError:
        raise SkindiffError(f"{name} must be a comma list of integers, got {text!r}") from None


def as_text(value: Any) -> str:
    """A setting as typed on the command line: `true`, `1,2`, `0.0005`."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return str(value)


def from_text(kind: Any, name: str, text: str) -> Any:
    """Parses the command-line text of a setting of type `kind`."""
    if kind is bool:
        if text not in ("true", "false"):
            raise SkindiffError(f"{name} must be true or false, got {text!r}")
        return text == "true"
    if typing.get_origin(kind) is tuple:
        return int_list(text, name) if typing.get_args(kind)[0] is int else comma_list(text)
    if kind is str:
        return str(text)
    try:
        return kind(text)
    except ValueError:
        raise SkindiffError(f"{name} must be a {kind.__name__}, got {text!r}") from None


def build_config(group: OptionGroup, options: Mapping[str, Any]) -> Any:
    """The config of `group` from option values (text or already typed); fields without a
    value (omitted, or shared with an option the command does not have) keep their default
    (the group's, else the config's)."""
    hints = typing.get_type_hints(group.config)
    values = {}
    for field in fields(group.config):
        name = field.name if field.name in group.shared else group.prefix + field.name
        if field.name in group.omit or name not in options:
            if field.name in dict(group.defaults):
                values[field.name] = group.default(field)
            continue
        kind, value = hints[field.name], options[name]
        values[field.name] = from_text(kind, name, value) if isinstance(value, str) else value
    return group.config(**values)


def option_values(group: OptionGroup, config: Any) -> dict[str, str]:
    """The options of `group` set from `config`, as text: the MLflow params of a stage."""
    return {
        name: as_text(getattr(config, name[len(group.prefix) :]))
        for name, _, _ in group.option_fields()
    }


def with_options(group: OptionGroup, config: Any, values: Mapping[str, str]) -> Any:
    """`config` with the options of `group` found in `values` (text) set; others unchanged."""
    kinds = {name: kind for name, kind, _ in group.option_fields()}
    changes = {
        name[len(group.prefix) :]: from_text(kinds[name], name, text)
        for name, text in values.items()
        if name in kinds
    }
    return replace(config, **changes)
