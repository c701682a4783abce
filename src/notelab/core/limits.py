"""Size bounds on a model, checked from its config before any tensor is allocated.

A config such as ``n_layers: 1000000`` or ``dim: 2**30`` would otherwise climb through all of the
machine's memory before failing. :func:`check_size` computes the parameter count from the config
(``config.num_parameters()``, else ``model_cls.num_parameters(config)``, else a build on the
``meta`` device, which allocates nothing) and compares ``parameters * bytes per parameter`` with
:func:`size_bound`: the smaller of ``DEFAULT_MAX_PARAMETERS`` parameters and
``MEMORY_FRACTION`` of the memory this process may use (physical RAM, or the cgroup limit when
lower). ``allow_large=True`` (CLI ``--allow-large``) lifts the bound for real big models.

Constructors that cannot take an ``allow_large`` argument (a model's ``__init__``) read it from
:func:`allow_large_models`, a context manager scoped to the current thread / task.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from notelab.core.errors import ConfigError

DEFAULT_MAX_PARAMETERS = 20_000_000_000
MEMORY_FRACTION = 0.8

_ALLOW_LARGE: contextvars.ContextVar[bool] = contextvars.ContextVar("notelab_allow_large", default=False)


@contextlib.contextmanager
def allow_large_models(allow: bool = True) -> Iterator[None]:
    """Within the block, :func:`check_size` calls that do not pass ``allow_large`` use ``allow``."""
    token = _ALLOW_LARGE.set(allow)
    try:
        yield
    finally:
        _ALLOW_LARGE.reset(token)


def allowed_large() -> bool:
    """Whether the enclosing :func:`allow_large_models` lifts the size bound (default ``False``)."""
    return _ALLOW_LARGE.get()


def available_memory() -> int | None:
    """Bytes this process may use: physical RAM, or the cgroup (v2 / v1) limit when lower; ``None`` if unknown."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        pass
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(f).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            limits.append(int(text))
    positive = [n for n in limits if n > 0]
    return min(positive) if positive else None


def size_bound(bytes_per_parameter: int) -> tuple[int, str]:
    """(largest allowed parameter count, how it was set) for parameters of ``bytes_per_parameter`` bytes."""
    bound, why = DEFAULT_MAX_PARAMETERS, f"the default cap of {DEFAULT_MAX_PARAMETERS:.3g} parameters"
    memory = available_memory()
    if memory is not None:
        by_memory = int(MEMORY_FRACTION * memory) // bytes_per_parameter
        if by_memory < bound:
            bound = by_memory
            why = f"{MEMORY_FRACTION:.0%} of this machine's {memory / 1e9:.1f} GB memory"
    return bound, why


def parameter_count(config: Any, model_cls: type | None = None) -> int:
    """Parameters of ``model_cls(config)`` (tied tensors once), computed without allocating it."""
    counter = getattr(config, "num_parameters", None)
    if callable(counter):
        return int(counter())
    if model_cls is not None and callable(getattr(model_cls, "num_parameters", None)):
        return int(model_cls.num_parameters(config))  # type: ignore[attr-defined]
    if model_cls is None:
        raise ConfigError(f"{type(config).__name__}: cannot count parameters without num_parameters or a model class")
    with torch.device("meta"):
        model = model_cls(config)
    return sum(p.numel() for p in model.parameters())


def check_size(
    config: Any,
    *,
    model_cls: type | None = None,
    allow_large: bool | None = None,
    dtype: torch.dtype | None = None,
) -> int:
    """Raise :class:`ConfigError` if the model of ``config`` exceeds :func:`size_bound`; returns its parameter count.

    Does nothing (returns 0) inside ``torch.device("meta")``. ``allow_large``
    ``None`` takes the value of the enclosing :func:`allow_large_models` (default ``False``).
    ``dtype`` (default: torch's default dtype) sets the bytes per parameter.
    """
    if torch.get_default_device().type == "meta":
        return 0  # nothing is allocated there (and parameter_count's own meta build comes through here)
    allow = allowed_large() if allow_large is None else allow_large
    n = parameter_count(config, model_cls)
    if allow:
        return n
    dtype = dtype or torch.get_default_dtype()
    nbytes = torch.empty((), dtype=dtype, device="meta").element_size()
    bound, why = size_bound(nbytes)
    if n > bound:
        name = model_cls.__name__ if model_cls is not None else type(config).__name__
        kind = str(dtype).removeprefix("torch.")
        raise ConfigError(
            f"{name}: the config gives {n:.3g} parameters ({n * nbytes / 1e9:.3g} GB in {kind}), "
            f"above the bound of {bound:.3g} parameters ({why}); pass allow_large=True (CLI --allow-large) "
            "to build a model this large"
        )
    return n
