"""One validator for the typed parameter blocks (TrainingConfig, EvaluationConfig).

A block is a frozen dataclass whose fields have no defaults (the YAML in
conf/base is where every value lives); ``read_settings`` builds it from the
parameters, refusing an unknown, missing, mistyped or out-of-range setting
with one error naming its dotted key. What a field accepts beyond its type is
declared on it: ``field(metadata=setting(minimum=1))``. Fields may be
``bool``, ``int``, ``float``, ``str``, a nested dataclass, ``list[X]``,
``dict[str, X]``, ``Any`` (not checked here) or any of these ``| None``; a bound or ``choices`` on a list
or dict applies to its elements.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


def setting(
    *,
    fingerprint: bool = True,
    minimum: float | None = None,
    exclusive_minimum: bool = False,
    maximum: float | None = None,
    choices: tuple[str, ...] = (),
) -> dict[str, Any]:
    """A field's metadata: what the setting accepts, and whether it enters a resume fingerprint.

    ``fingerprint=False``: where or how often, not what is trained (paths, logging, checkpointing,
    processes); a checkpoint made with another value is resumed. Only TrainingConfig reads it.
    """
    return {
        "fingerprint": fingerprint,
        "minimum": minimum,
        "exclusive_minimum": exclusive_minimum,
        "maximum": maximum,
        "choices": choices,
    }


@dataclass(frozen=True)
class _Source:
    """Where a block's settings come from, for the error messages."""

    stage: str  # the block's top key: "training", "evaluate"
    parameters_file: str
    error: type[ValueError]


def read_settings(cls: type, values: Any, stage: str, parameters_file: str, error: type[ValueError]) -> Any:
    """``cls`` built from ``values`` (the ``stage`` parameters), checked.

    Raises ``error`` naming the dotted key (``stage.…``) of a setting that is unknown, missing,
    of the wrong type or out of range.
    """
    return _build(cls, values, stage, _Source(stage, parameters_file, error))


def _build(cls: type, values: Any, key: str, source: _Source) -> Any:
    if not isinstance(values, Mapping):
        raise source.error(f"{key} must be a mapping of settings, got {values!r}")
    specs = {spec.name: spec for spec in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(specs))
    article = "an" if source.stage[0] in "aeiou" else "a"
    if unknown:
        raise source.error(f"{key}.{unknown[0]} is not {article} {source.stage} setting ({source.parameters_file})")
    hints = typing.get_type_hints(cls)
    checked = {}
    for name, spec in specs.items():
        if name in values:
            checked[name] = _checked(hints[name], values[name], f"{key}.{name}", spec.metadata, source)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise source.error(f"{key}.{name} is missing ({source.parameters_file} sets every {source.stage} setting)")
    return cls(**checked)


def _checked(kind: Any, value: Any, key: str, metadata: Mapping[str, Any], source: _Source) -> Any:
    """``value`` as a ``kind``; raises naming ``key`` and what it accepts."""
    optional = isinstance(kind, types.UnionType) and type(None) in typing.get_args(kind)
    if optional:
        if value is None:
            return None
        (kind,) = (arg for arg in typing.get_args(kind) if arg is not type(None))
    if kind is Any:  # checked elsewhere (finetune.training's values: by TrainingConfig, once merged)
        return value
    if dataclasses.is_dataclass(kind):
        return _build(typing.cast(type, kind), value, key, source)
    container = typing.get_origin(kind)
    if container is list:
        if not isinstance(value, list):
            raise source.error(f"{key} must be a list, got {value!r}")
        (item,) = typing.get_args(kind)
        return [_checked(item, v, f"{key}[{i}]", metadata, source) for i, v in enumerate(value)]
    if container is dict:
        if not isinstance(value, Mapping) or not all(isinstance(name, str) for name in value):
            raise source.error(f"{key} must be a mapping with string keys, got {value!r}")
        _, item = typing.get_args(kind)
        return {name: _checked(item, v, f"{key}.{name}", metadata, source) for name, v in value.items()}
    # bool is an int to Python, not to a setting; an integer is a fine float (1 means 1.0)
    fits = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[kind]
    low, high = metadata.get("minimum"), metadata.get("maximum")
    in_range = fits and not (
        (low is not None and (value <= low if metadata.get("exclusive_minimum") else value < low))
        or (high is not None and value > high)
        or (metadata.get("choices") and value not in metadata["choices"])
    )
    if not in_range:
        raise source.error(f"{key} must be {_accepted(kind, metadata, optional)}, got {value!r}")
    return float(value) if kind is float else value


def _accepted(kind: type, metadata: Mapping[str, Any], optional: bool) -> str:
    """What a setting accepts, in words: "a positive integer or null"."""
    low, high = metadata.get("minimum"), metadata.get("maximum")
    if metadata.get("choices"):
        words = "one of " + ", ".join(repr(choice) for choice in metadata["choices"])
    elif kind is bool:
        words = "true or false"
    elif kind is str:
        words = "a string"
    else:
        noun = "integer" if kind is int else "number"
        if low is not None and high is not None:
            words = f"an {noun} from {low} to {high}" if kind is int else f"a {noun} from {low} to {high}"
        elif (low == 0 and metadata.get("exclusive_minimum")) or (low == 1 and kind is int):
            words = f"a positive {noun}"
        elif low == 0:
            words = f"a non-negative {noun}"
        else:
            words = f"an {noun}" if kind is int else f"a {noun}"
    return words + (" or null" if optional else "")
