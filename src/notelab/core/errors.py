"""Typed errors raised at the library's boundaries.

Every error says what was expected and what was given, in one line, so that the CLI can print
it as is and exit with code 2 (`notelab.cli` maps :class:`NotelabError` to exit code 2).
"""

from __future__ import annotations

from collections.abc import Iterable


class NotelabError(Exception):
    """Base class of every error notelab raises on bad input."""


class ConfigError(NotelabError, ValueError):
    """A configuration value is out of range, of the wrong type, or an unknown name."""


class ShapeError(NotelabError, ValueError):
    """A tensor has the wrong shape, dtype or range."""


class DataError(NotelabError, ValueError):
    """A data set is missing, empty or corrupt."""


class CheckpointError(NotelabError):
    """A checkpoint directory is missing files, truncated, or does not match its config."""


class TrainingDivergedError(NotelabError, RuntimeError):
    """The loss or the gradients became NaN or infinite."""


def unknown_name(kind: str, name: object, known: Iterable[str]) -> ConfigError:
    """Error for a name that is not one of ``known``; lists the known names."""
    return ConfigError(f"unknown {kind} {name!r}; known: {', '.join(sorted(known))}")


def check_shape(name: str, shape: tuple[int, ...], expected: tuple[int | None, ...]) -> None:
    """Raise :class:`ShapeError` unless ``shape`` matches ``expected`` (``None`` = any size)."""
    ok = len(shape) == len(expected) and all(e is None or e == s for s, e in zip(shape, expected))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ShapeError(f"{name}: expected shape {want}, got {tuple(shape)}")
