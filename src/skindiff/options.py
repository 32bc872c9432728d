"""One name per setting: config field <-> CLI option <-> MLproject parameter <-> MLflow param.

A command's settings are fields of config dataclasses (`core.settings.Settings`). Each config
class is shown through an OptionGroup whose fields become options named `prefix + field`
(`TextualInversionConfig.learning_rate` is `ti_learning_rate`). Fields in the group's
`shared` tuple (seed, base model, ...) are one unprefixed option for every config that has
them, so `--seed 3` seeds every stage of a command.
"""

from collections.abc import Iterator, Mapping
from dataclasses import Field, dataclass, field, fields, replace
from typing import Any

from skindiff.classify.config import Arch, ClassifierConfig, Finetune
from skindiff.core.settings import as_text, coerce, env_of, field_types, help_of
from skindiff.data.config import DownloadConfig, PrepareConfig, Scenario
from skindiff.diffusion.config import (
    GenerateConfig,
    LoraConfig,
    PretrainConfig,
    PretrainTarget,
    TextualInversionConfig,
)
from skindiff.errors import SkindiffError
from skindiff.plans import (
    AblationPlan,
    DryRunConfig,
    EvaluateConfig,
    ReportConfig,
    StudyPlan,
    TrackingConfig,
    TuneConfig,
    UpstreamRuns,
)
from skindiff.quality.config import QualityConfig


@dataclass(frozen=True)
class Option:
    name: str
    kind: Any
    default: Any
    help: str
    env: str | None = None  # an environment variable that replaces the default


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

    def _option_fields(self) -> Iterator[tuple[Field, str, Any]]:
        """(field, option name, type) of every field that is an option of this group."""
        kinds = field_types(self.config)
        for config_field in fields(self.config):
            if config_field.name not in self.omit:
                name = config_field.name
                yield config_field, self.option_name(name), kinds[name]

    def options(self) -> Iterator[Option]:
        defaults = dict(self.defaults)
        for config_field, name, kind in self._option_fields():
            default = defaults.get(config_field.name, config_field.default)
            yield Option(name, kind, default, help_of(config_field), env_of(config_field))

    def only(self, *names: str) -> "OptionGroup":
        """This group with just the fields `names` as options."""
        rest = tuple(f.name for f in fields(self.config) if f.name not in names)
        return replace(self, omit=rest)

    def _parse(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Field -> value of the options found in `values` (text or typed), parsed here so
        that an error names the option, not the field."""
        return {
            config_field.name: coerce(kind, name, values[name])
            for config_field, name, kind in self._option_fields()
            if name in values
        }

    def build(self, values: Mapping[str, Any]) -> Any:
        """The config from option values; a field without a value keeps its default (the
        group's, else the config's)."""
        return self.config(**dict(self.defaults) | self._parse(values))

    def values(self, config: Any) -> dict[str, str]:
        """The options of this group set from `config`, as text: the MLflow params of a stage."""
        return {name: as_text(getattr(config, f.name)) for f, name, _ in self._option_fields()}

    def with_values(self, config: Any, values: Mapping[str, Any]) -> Any:
        """`config` with the options of this group found in `values` set; others unchanged."""
        return replace(config, **self._parse(values))


# Fields a diffusion config takes from one option shared by every stage of a command.
_MODEL_FIELDS = ("seed", "base_model", "resolution", "mixed_precision")
DATA = OptionGroup(PrepareConfig)
# One option for what both adapters train on.
TEXTUAL_INVERSION = OptionGroup(
    TextualInversionConfig, "ti_", shared=(*_MODEL_FIELDS, "conditions", "generator_images")
)
LORA = OptionGroup(LoraConfig, "lora_", shared=(*_MODEL_FIELDS, "generator_images"))
GENERATE = OptionGroup(GenerateConfig, shared=_MODEL_FIELDS)
CLASSIFIER = OptionGroup(ClassifierConfig, shared=("seed",))
RUNS = OptionGroup(UpstreamRuns)
STUDY = OptionGroup(StudyPlan)
ABLATION = OptionGroup(AblationPlan)
EVALUATE = OptionGroup(EvaluateConfig)
QUALITY = OptionGroup(QualityConfig)
DOWNLOAD = OptionGroup(DownloadConfig)
REPORT = OptionGroup(ReportConfig)
TUNE = OptionGroup(TuneConfig)
PRETRAIN = OptionGroup(PretrainConfig)
PRETRAIN_TARGET = OptionGroup(PretrainTarget)
TRACKING = OptionGroup(TrackingConfig)
# Options of the command line only, as TRACKING's: `mlflow run` would open a run for a dry run.
DRY_RUN = OptionGroup(DryRunConfig)


def omitting(group: OptionGroup, *names: str) -> OptionGroup:
    """`group` without the options of fields `names` (they keep their defaults)."""
    return replace(group, omit=(*group.omit, *names))


def with_defaults(group: OptionGroup, **defaults: Any) -> OptionGroup:
    """`group` with other defaults for the fields named (the options stay)."""
    return replace(group, defaults=(*group.defaults, *defaults.items()))


# What the pipeline commands set themselves: each pair's scenario and seed, and so on. They
# keep the paper's splits: only `tune` leaves other scenarios' test images out.
PAIR_DATA = omitting(DATA, "scenario", "seed", "exclude_test_of")
PAIR_TEXTUAL_INVERSION = omitting(TEXTUAL_INVERSION, "seed")
PAIR_LORA = omitting(LORA, "seed")
PAIR_GENERATE = omitting(GENERATE, "seed")
PAIR_CLASSIFIER = omitting(CLASSIFIER, "seed", "arch", "train_type")
ABLATION_GENERATE = omitting(GENERATE, "seed", "mode")
ABLATION_CLASSIFIER = replace(
    omitting(CLASSIFIER, "seed", "train_type"), defaults=(("arch", Arch.VGG16),)
)
# Tuned on scenario i, frozen for ii and iii: by default none of their test images is used.
TUNE_DATA = replace(
    omitting(DATA, "scenario"), defaults=(("exclude_test_of", (Scenario.II, Scenario.III)),)
)
SYN_CLASSIFIER = omitting(CLASSIFIER, "train_type")


@dataclass(frozen=True)
class StudyConfigs:
    """The settings of every stage of the study; `for_pair` gives those of one (scenario,
    seed)."""

    data: PrepareConfig
    textual_inversion: TextualInversionConfig
    lora: LoraConfig
    generate: GenerateConfig
    classifier: ClassifierConfig
    quality: QualityConfig = field(default_factory=QualityConfig)  # `main`'s synthetic_quality

    def groups(self) -> tuple[tuple[OptionGroup, Any], ...]:
        """(option group, config) of each stage, in pipeline order."""
        return (
            (DATA, self.data),
            (TEXTUAL_INVERSION, self.textual_inversion),
            (LORA, self.lora),
            (GENERATE, self.generate),
            (CLASSIFIER, self.classifier),
        )

    def with_frozen(self, frozen: Mapping[str, str], source: str) -> "StudyConfigs":
        """These settings with the frozen ones replacing theirs; unknown names are refused."""
        known = {option.name for group, _ in self.groups() for option in group.options()}
        unknown = sorted(set(frozen) - known)
        if unknown:
            raise SkindiffError(f"frozen params {source}: unknown option(s) {', '.join(unknown)}")
        stages = (group.with_values(c, frozen) for group, c in self.groups())
        return StudyConfigs(*stages, quality=self.quality)

    def for_pair(self, scenario: Scenario, seed: int) -> "StudyConfigs":
        return StudyConfigs(
            replace(self.data, scenario=scenario, seed=seed),
            replace(self.textual_inversion, seed=seed),
            replace(self.lora, seed=seed),
            replace(self.generate, seed=seed),
            replace(self.classifier, seed=seed),
            self.quality,
        )


@dataclass(frozen=True)
class StudyGroups:
    """The option groups of a command that sets every stage of the study (main, ablation,
    tune); builds their StudyConfigs."""

    data: OptionGroup
    textual_inversion: OptionGroup
    lora: OptionGroup
    generate: OptionGroup
    classifier: OptionGroup
    quality: OptionGroup | None = None  # a command that runs synthetic_quality: main, demo

    def _groups(self) -> tuple[OptionGroup, ...]:
        stages = (self.data, self.textual_inversion, self.lora, self.generate, self.classifier)
        return stages + ((self.quality,) if self.quality else ())

    def options(self) -> Iterator[Option]:
        for group in self._groups():
            yield from group.options()

    def build(self, values: Mapping[str, Any]) -> StudyConfigs:
        return StudyConfigs(*(group.build(values) for group in self._groups()))

    def values(self, configs: StudyConfigs) -> dict[str, str]:
        """The options of these groups set from `configs`: the params of the command's run."""
        stage_configs = [config for _, config in configs.groups()] + [configs.quality]
        values: dict[str, str] = {}
        for group, config in zip(self._groups(), stage_configs, strict=False):
            values |= group.values(config)
        return values


MAIN_STUDY = StudyGroups(
    PAIR_DATA, PAIR_TEXTUAL_INVERSION, PAIR_LORA, PAIR_GENERATE, PAIR_CLASSIFIER, QUALITY
)
ABLATION_STUDY = StudyGroups(
    PAIR_DATA, PAIR_TEXTUAL_INVERSION, PAIR_LORA, ABLATION_GENERATE, ABLATION_CLASSIFIER
)
TUNE_STUDY = StudyGroups(TUNE_DATA, TEXTUAL_INVERSION, LORA, GENERATE, SYN_CLASSIFIER)

# The demo: `main` on the embedded default with settings a CPU runs in minutes (measured in
# docs/generated/quickstart.md): fewer steps than the reference, Textual Inversion with batches
# mixing all conditions (7x cheaper than a run per token), LoRA at lr 1e-4 (at the reference
# 5e-6, 500 steps leave the adapter almost untouched), and the small CNN trained in full on 64
# px crops (the demo's training sets are small). Every option can still be given.
DEMO_STUDY = StudyGroups(
    PAIR_DATA,
    with_defaults(PAIR_TEXTUAL_INVERSION, max_train_steps=100, per_token=False),
    with_defaults(PAIR_LORA, max_train_steps=500, learning_rate=1e-4),
    with_defaults(PAIR_GENERATE, num_inference_steps=40),
    with_defaults(PAIR_CLASSIFIER, finetune=Finetune.FULL, epochs=20, batch_size=16, image_size=64),
    QUALITY,
)
DEMO_PLAN = with_defaults(STUDY, seeds=(0,), archs=(Arch.TINY,))
