"""One name per setting: config field <-> CLI option <-> MLproject parameter <-> MLflow param.

A command's settings are fields of config dataclasses (`core.settings.Settings`). Each config
class is shown through an OptionGroup whose fields become options named `prefix + field`
(`TextualInversionConfig.learning_rate` is `ti_learning_rate`). Fields in the group's
`shared` tuple (seed, base model, ...) are one unprefixed option for every config that has
them, so `--seed 3` seeds every stage of a command.
"""

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from skindiff.classify.config import Arch, ClassifierConfig
from skindiff.core.settings import as_text, field_types, help_of
from skindiff.data.config import PrepareConfig
from skindiff.diffusion.config import GenerateConfig, LoraConfig, TextualInversionConfig
from skindiff.tracking.settings import (
    AblationPlan,
    EvaluateConfig,
    ReportConfig,
    StudyPlan,
    TuneConfig,
    UpstreamRuns,
)


@dataclass(frozen=True)
class Option:
    name: str
    kind: Any
    default: Any
    help: str


@dataclass(frozen=True)
class OptionGroup:
    """The fields of one config class as options named `prefix + field`. Fields in `shared` are
    unprefixed; fields in `omit` keep their default and are no option; `defaults` ((field,
    value) pairs) replace the config's defaults, for a command whose protocol differs (the
    ablation's VGG-16)."""

    config: type
    prefix: str = ""
    shared: tuple[str, ...] = ()
    omit: tuple[str, ...] = ()
    defaults: tuple[tuple[str, Any], ...] = ()

    def option_name(self, field_name: str) -> str:
        return field_name if field_name in self.shared else self.prefix + field_name

    def options(self) -> Iterator[Option]:
        kinds = field_types(self.config)
        defaults = dict(self.defaults)
        for config_field in fields(self.config):
            if config_field.name not in self.omit:
                yield Option(
                    self.option_name(config_field.name),
                    kinds[config_field.name],
                    defaults.get(config_field.name, config_field.default),
                    help_of(config_field),
                )

    def only(self, *names: str) -> "OptionGroup":
        """This group with just the fields `names` as options."""
        rest = tuple(f.name for f in fields(self.config) if f.name not in names)
        return replace(self, omit=rest)

    def build(self, values: Mapping[str, Any]) -> Any:
        """The config from option values (text or typed); a field without a value keeps its
        default (the group's, else the config's)."""
        chosen = dict(self.defaults)
        for config_field in fields(self.config):
            name = self.option_name(config_field.name)
            if config_field.name not in self.omit and name in values:
                chosen[config_field.name] = values[name]
        return self.config(**chosen)

    def values(self, config: Any) -> dict[str, str]:
        """The options of this group set from `config`, as text: the MLflow params of a stage."""
        return {
            self.option_name(f.name): as_text(getattr(config, f.name))
            for f in fields(self.config)
            if f.name not in self.omit
        }

    def with_values(self, config: Any, values: Mapping[str, str]) -> Any:
        """`config` with the options of this group found in `values` (text) set."""
        changes = {
            f.name: values[self.option_name(f.name)]
            for f in fields(self.config)
            if f.name not in self.omit and self.option_name(f.name) in values
        }
        return replace(config, **changes)


# Fields a diffusion config takes from one option shared by every stage of a command.
_MODEL_FIELDS = ("seed", "base_model", "resolution", "mixed_precision")
DATA = OptionGroup(PrepareConfig)
TEXTUAL_INVERSION = OptionGroup(
    TextualInversionConfig, "ti_", shared=(*_MODEL_FIELDS, "conditions")
)
LORA = OptionGroup(LoraConfig, "lora_", shared=_MODEL_FIELDS)
GENERATE = OptionGroup(GenerateConfig, shared=_MODEL_FIELDS)
CLASSIFIER = OptionGroup(ClassifierConfig, shared=("seed",))
RUNS = OptionGroup(UpstreamRuns)
STUDY = OptionGroup(StudyPlan)
ABLATION = OptionGroup(AblationPlan)
EVALUATE = OptionGroup(EvaluateConfig)
REPORT = OptionGroup(ReportConfig)
TUNE = OptionGroup(TuneConfig)


def omitting(group: OptionGroup, *names: str) -> OptionGroup:
    """`group` without the options of fields `names` (they keep their defaults)."""
    return replace(group, omit=(*group.omit, *names))


# What the pipeline commands set themselves: each pair's scenario and seed, and so on.
PAIR_DATA = omitting(DATA, "scenario", "seed")
PAIR_TEXTUAL_INVERSION = omitting(TEXTUAL_INVERSION, "seed")
PAIR_LORA = omitting(LORA, "seed")
PAIR_GENERATE = omitting(GENERATE, "seed")
PAIR_CLASSIFIER = omitting(CLASSIFIER, "seed", "arch", "train_type")
ABLATION_GENERATE = omitting(GENERATE, "seed", "mode")
ABLATION_CLASSIFIER = replace(
    omitting(CLASSIFIER, "seed", "train_type"), defaults=(("arch", Arch.VGG16),)
)
SCENARIO_I_DATA = omitting(DATA, "scenario")
SYN_CLASSIFIER = omitting(CLASSIFIER, "train_type")
