"""Tier 0: the shared blocks every family builds on (torch only).

The names below are imported on first use (PEP 562 module ``__getattr__``), so that importing a
torch-free submodule such as ``notelab.core.errors`` (what ``notelab --help`` needs) does not
import torch; ``from notelab.core import X`` works as before.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the submodule that defines it
_EXPORTS = {
    "PretrainedMixin": "checkpoint",
    "load_state_into": "checkpoint",
    "load_weights": "checkpoint",
    "save_weights": "checkpoint",
    "config_from_dict": "config",
    "config_to_dict": "config",
    "load_json": "config",
    "save_config": "config",
    "EMA": "ema",
    "NFECounter": "integrate",
    "counted": "integrate",
    "divergence": "integrate",
    "euler": "integrate",
    "heun": "integrate",
    "odeint": "integrate",
    "rk4": "integrate",
    "allow_large_models": "limits",
    "check_size": "limits",
    "CheckpointError": "errors",
    "ConfigError": "errors",
    "DataError": "errors",
    "NotelabError": "errors",
    "ShapeError": "errors",
    "TrainingDivergedError": "errors",
    "unknown_name": "errors",
    "autocast": "runtime",
    "autocast_dtype": "runtime",
    "get_device": "runtime",
    "seed_everything": "runtime",
    "append_dims": "tensor",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
