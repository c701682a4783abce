"""Dataclass configs to and from JSON, with errors that name the bad field."""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from notelab.core.errors import ConfigError
from notelab.core.io import atomic_write_text

C = TypeVar("C")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as a JSON-ready dict (tuples become lists)."""
    if not dataclasses.is_dataclass(config):
        raise ConfigError(f"expected a dataclass config, got {type(config).__name__}")
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _coerce(value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if typing.get_origin(arg) is tuple and isinstance(value, list):
                return tuple(value)
    return value


def config_from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Build ``cls`` from ``data``; unknown keys are an error that lists the known fields."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(v, hints.get(k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{cls.__name__}: {e}") from e


def save_config(config: Any, path: str | os.PathLike, **extra: Any) -> None:
    """Write ``config`` (plus ``extra`` top-level keys) as pretty JSON, atomically."""
    data = {**extra, **config_to_dict(config)}
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def load_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON object, with a one-line error for a missing or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"expected a JSON file at {path}, found none")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
