"""What `tune` searches: generator options and their ranges, as data.

A search space maps option names (the CLI / MLflow names, e.g. `ti_learning_rate`) to a range
or a list of choices, as in its YAML form:

    ti_learning_rate: {low: 1.0e-4, high: 2.5e-3, log: true}
    num_inference_steps: {low: 50, high: 150, step: 25}
    lora_rank: {choices: [4, 8, 16]}

Whether a range is of integers or floats follows the option's type. A user's file replaces the
built-in space: the options it names are tuned, all others keep their option value.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from skindiff.errors import SkindiffError
from skindiff.options import GENERATE, LORA, TEXTUAL_INVERSION

# Centred (geometrically where log) on the reference code's values (the configs' defaults).
BUILTIN_SPACE: dict[str, dict[str, Any]] = {
    "ti_learning_rate": {"low": 1e-4, "high": 2.5e-3, "log": True},  # 5e-4
    "ti_max_train_steps": {"low": 250, "high": 1000, "log": True},  # 500
    "lora_rank": {"choices": [4, 8, 16]},  # 8
    "lora_learning_rate": {"low": 1e-6, "high": 2.5e-5, "log": True},  # 5e-6
    "lora_max_train_steps": {"low": 1500, "high": 6000, "log": True},  # 3000
    "strength": {"low": 0.3, "high": 0.7},  # 0.5
    "guidance_scale": {"low": 1.0, "high": 3.0},  # 2.0
    "num_inference_steps": {"low": 50, "high": 150, "step": 25},  # 100
}

SPEC_KEYS = ("low", "high", "log", "step", "choices")


def tunable_options() -> dict[str, Any]:
    """Option name -> type of the generator options a search space may name: numbers, text
    and choices (enums)."""
    return {
        option.name: option.kind
        for group in (TEXTUAL_INVERSION, LORA, GENERATE)
        for option in group.options()
        if option.kind in (int, float, str) or _is_choice(option.kind)
    }


def _is_choice(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, Enum)


@dataclass(frozen=True)
class Dimension:
    """One tuned option: a range of `kind` (int or float), or a list of choices."""

    name: str
    kind: type
    low: float = 0
    high: float = 0
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    def suggest(self, trial: Any) -> Any:
        """The value an Optuna trial picks for this option."""
        if self.choices:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind is int:
            step = int(self.step or 1)
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), step=step, log=self.log
            )
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)


def load_search_space(path: str = "") -> list[Dimension]:
    """The space of a YAML file, or the built-in one for an empty path."""
    if not path:
        return parse_search_space(BUILTIN_SPACE, "the built-in search space")
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise SkindiffError(f"search_space {path}: cannot read it ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise SkindiffError(
            f"search_space {path}: not valid YAML ({err})".splitlines()[0]
        ) from None
    if not isinstance(spec, dict) or not spec:
        raise SkindiffError(f"search_space {path}: must be a mapping of option name -> range")
    return parse_search_space(spec, path)


def parse_search_space(spec: Mapping[str, Any], source: str) -> list[Dimension]:
    """Checked dimensions; one-line errors naming `source` and the option."""
    options = tunable_options()
    return [_dimension(str(name), options, entry, source) for name, entry in spec.items()]


def _dimension(name: str, options: dict[str, Any], entry: Any, source: str) -> Dimension:
    def fail(problem: str) -> SkindiffError:
        return SkindiffError(f"search_space {source}: {name}: {problem}")

    if name not in options:
        raise fail(f"not a tunable option (one of {', '.join(sorted(options))})")
    if not isinstance(entry, dict):
        raise fail("must be a mapping such as {low: 1, high: 10} or {choices: [4, 8]}")
    unknown = sorted(set(entry) - set(SPEC_KEYS))
    if unknown:
        raise fail(f"unknown key {unknown[0]!r} (use {', '.join(SPEC_KEYS)})")
    kind = options[name]
    if "choices" in entry:
        if set(entry) != {"choices"}:
            raise fail("choices cannot be combined with a range")
        return Dimension(name, kind, choices=_choices(kind, entry["choices"], fail))
    if kind is str or _is_choice(kind):
        raise fail("a text option takes choices, not a range")
    if "low" not in entry or "high" not in entry:
        raise fail("a range needs low and high")
    low, high = (_number(kind, entry[key], key, fail) for key in ("low", "high"))
    log = entry.get("log", False)
    step = entry.get("step")
    if not isinstance(log, bool):
        raise fail(f"log must be true or false, got {log!r}")
    if not low < high:
        raise fail(f"low must be below high, got {low} and {high}")
    if log and low <= 0:
        raise fail(f"a log range needs low > 0, got {low}")
    if step is not None:
        step = _number(kind, step, "step", fail)
        if log or step <= 0:
            raise fail("step must be positive and cannot be combined with log")
    return Dimension(name, kind, low, high, log, step)


def _number(kind: type, value: Any, key: str, fail: Callable) -> float:
    allowed = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, allowed):
        raise fail(f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return value


def _choices(kind: type, values: Any, fail: Callable) -> tuple:
    if not isinstance(values, list) or not values:
        raise fail("choices must be a non-empty list")
    if _is_choice(kind):
        try:
            return tuple(str(kind(value)) for value in values)  # Optuna stores plain values
        except ValueError as err:
            raise fail(f"choices: {err}") from None
    if kind is not str:
        for value in values:
            _number(kind, value, "choices", fail)
    return tuple(kind(value) for value in values)
