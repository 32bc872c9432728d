"""Typed settings: config dataclasses whose fields carry their help text and check themselves.

A stage's settings are a frozen dataclass deriving from `Settings`, each field declared with
`setting(default, help)`. Constructing one coerces every value to its declared type (text and
lists, as command lines, MLflow params and JSON files give them, become enums, numbers, bools
and tuples; "" is None for an optional field), then `check()` refuses values out of range with
one line naming the parameter. So a config made by the CLI, by a test or from a stored JSON
file is the same object, and an invalid one never exists.

Only the standard library is imported here: `skindiff --help` builds its options from these
classes without loading torch.
"""

import types
import typing
from dataclasses import Field, field, fields
from enum import Enum, StrEnum
from functools import cache
from pathlib import Path
from typing import Any

from skindiff.errors import SkindiffError

# Seeds reach pandas' `random_state` (the flexible subsets are drawn as the reference draws
# them) and numpy, which take seeds below 2**32.
MAX_SEED = 2**32 - 1


def check_seed(name: str, seed: int) -> None:
    """Refuses a seed outside 0..MAX_SEED, naming the parameter `name`."""
    if not 0 <= seed <= MAX_SEED:
        raise SkindiffError(f"{name} must be an integer from 0 to {MAX_SEED}, got {seed}")


class Precision(StrEnum):
    """Mixed precision of diffusion work; `auto` is fp16 on a GPU and full precision on a CPU,
    where bf16 runs too and fp16 does not."""

    AUTO = "auto"
    NO = "no"
    FP16 = "fp16"
    BF16 = "bf16"


def setting(default: Any, help: str, env: str | None = None) -> Any:
    """A config field with its default and the help text its CLI option shows; `env` names an
    environment variable that replaces the default (the option given still wins)."""
    return field(default=default, metadata={"help": help, "env": env})


def help_of(config_field: Field) -> str:
    return config_field.metadata.get("help", "")


def env_of(config_field: Field) -> str | None:
    return config_field.metadata.get("env")


@cache
def field_types(config: type) -> dict[str, Any]:
    """Declared type of each field of a config class (annotations resolved once per class)."""
    return typing.get_type_hints(config)


class Settings:
    """Base of the config dataclasses (see the module docstring)."""

    def __post_init__(self) -> None:
        kinds = field_types(type(self))
        for config_field in fields(self):
            name = config_field.name
            value = coerce(kinds[name], name, getattr(self, name))
            object.__setattr__(self, name, value)
        self.check()

    def check(self) -> None:
        """Refuses values out of range (SkindiffError naming the parameter)."""


def comma_list(text: str) -> tuple[str, ...]:
    """'a, b,c' -> ('a', 'b', 'c')."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def as_text(value: Any) -> str:
    """A setting as typed on the command line: `true`, `1,2`, `0.0005`, "" for None."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, list | tuple):
        return ",".join(as_text(item) for item in value)
    return str(value)


def choices_of(kind: type[Enum]) -> str:
    return ", ".join(str(member.value) for member in kind)


def coerce(kind: Any, name: str, value: Any) -> Any:
    """`value` (text, or already of some type) as a value of type `kind`; one-line errors."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(args, name, value)
    if origin is tuple:
        items = comma_list(value) if isinstance(value, str) else tuple(value)
        try:
            return tuple(coerce(args[0], name, item) for item in items)
        except SkindiffError:
            if _is_text_type(args[0]):
                raise  # it names the item and says what is wrong with it
            what = choices_of(args[0]) if _is_enum(args[0]) else f"{args[0].__name__}s"
            raise SkindiffError(
                f"{name} must be a comma list of {what}, got {as_text(value)!r}"
            ) from None
    if _is_enum(kind):
        try:
            return kind(value)
        except ValueError:
            raise SkindiffError(
                f"{name} must be one of {choices_of(kind)}, got {as_text(value)!r}"
            ) from None
    if _is_text_type(kind):
        try:
            return kind(value)
        except ValueError as err:
            raise SkindiffError(f"{name} {err}") from None
    if kind is bool:
        if isinstance(value, bool):
            return value
        if value in ("true", "false"):
            return value == "true"
        raise SkindiffError(f"{name} must be true or false, got {value!r}")
    if kind in (int, float):
        if isinstance(value, bool) or (kind is int and isinstance(value, float)):
            raise SkindiffError(f"{name} must be an {kind.__name__}, got {value!r}")
        try:
            return kind(value)
        except (TypeError, ValueError):
            article = "an" if kind is int else "a"
            raise SkindiffError(
                f"{name} must be {article} {kind.__name__}, got {value!r}"
            ) from None
    if kind in (str, Path):
        return kind(value)
    return value


def _is_enum(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, Enum)


def _is_text_type(kind: Any) -> bool:
    """A str subclass, not an enum, that checks its text (`classify.config.Arch`): its
    ValueError's message completes "<name> ...", e.g. "must be one of ..., got 'x'"."""
    return (
        isinstance(kind, type) and issubclass(kind, str) and kind is not str and not _is_enum(kind)
    )


def _coerce_union(kinds: tuple, name: str, value: Any) -> Any:
    """`X | None` (None or "" -> None), or the first of `A | B` that takes the value."""
    if value is None or (value == "" and type(None) in kinds):
        return None
    options = [kind for kind in kinds if kind is not type(None)]
    for kind in options[:-1]:
        try:
            return coerce(kind, name, value)
        except SkindiffError:
            continue
    return coerce(options[-1], name, value)
