"""Dataclass configs to and from JSON, with errors that name the bad field."""

from __future__ import annotations

import dataclasses
import json
import math
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


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if isinstance(hint, type):
        return {"int": "an integer", "float": "a number", "bool": "true/false", "str": "a string"}.get(
            hint.__name__, hint.__name__
        )
    return str(hint).replace("typing.", "")


def _check(value: Any, hint: Any, where: str) -> Any:
    """``value`` (from JSON) checked against the type hint ``hint``; returns it converted (lists to tuples,
    objects to nested dataclasses, integers to floats for float fields). Non-finite numbers are refused."""
    if hint is Any or hint is None:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: X's own error is the informative one
            return _check(value, options[0], where)
        for arg in options:
            try:
                return _check(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {_given(value)}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {_given(value)}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: expected one of {', '.join(map(repr, args))}, got {_given(value)}")
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if isinstance(value, hint):
            return value
        return config_from_dict(hint, value, where)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_check(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
            if args and len(args) != len(value):
                raise ConfigError(f"{where}: expected a list of {len(args)} values, got {len(value)}")
            return tuple(
                _check(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args or [Any] * len(value)))
            )
    elif origin is list:
        if isinstance(value, list):
            item = args[0] if args else Any
            return [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            key, item = args if args else (Any, Any)
            return {_check(k, key, f"{where} key"): _check(v, item, f"{where}.{k}") for k, v in value.items()}
    else:  # a type this checker does not know: the dataclass's own __post_init__ decides
        _check_finite(value, where)
        return value
    raise ConfigError(f"{where}: expected {_type_name(hint)}, got {_given(value)}")


def _given(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _check_finite(value: Any, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{where}.{k}")


def config_from_dict(cls: type[C], data: dict[str, Any], where: str | None = None) -> C:
    """Build ``cls`` from ``data`` (parsed JSON), checking every field against its type hint.

    Unknown keys are an error that lists the known fields; a value of the wrong type, or a
    non-finite number, is an error naming the field, the expected type and the value. Ranges are
    the dataclass's own ``__post_init__``'s to check.
    """
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {_given(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(map(str, unknown))}; known: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _check(v, hints.get(k, Any), f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from e


def save_config(config: Any, path: str | os.PathLike, **extra: Any) -> None:
    """Write ``config`` (plus ``extra`` top-level keys) as pretty JSON, atomically."""
    data = {**extra, **config_to_dict(config)}
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


MAX_JSON_BYTES = 64 * 2**20  # configs and trainer states are kilobytes; a bigger file is not one of them


class _NonFinite(str):
    """What the parser returns for ``NaN`` / ``Infinity`` / ``-Infinity``, so the error can name the field."""


def _non_finite_at(value: Any, where: str) -> str | None:
    if isinstance(value, _NonFinite):
        return f"{where.lstrip('.')}: expected a finite number, got {value}"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _non_finite_at(item, f"{where}.{key}" if isinstance(value, dict) else f"{where}[{key}]")
        if found is not None:
            return found
    return None


def load_json(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """Read a JSON object from UTF-8 ``path``, with a one-line :class:`ConfigError` for a missing, oversized,
    non-UTF-8, truncated or corrupt file, a non-object top level, or a ``NaN`` / ``Infinity`` anywhere."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"expected a JSON file at {path}, found none")
    size = path.stat().st_size
    if size > max_bytes:
        raise ConfigError(f"{path}: expected a JSON file of at most {max_bytes} bytes, got {size}")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_NonFinite)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: expected UTF-8 text, got byte {e.object[e.start]:#04x} at offset {e.start}") from e
    except (json.JSONDecodeError, ValueError, RecursionError) as e:
        raise ConfigError(f"{path}: not valid JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {_given(data)}")
    bad = _non_finite_at(data, "")
    if bad is not None:
        raise ConfigError(f"{path}: {bad}")
    return data
