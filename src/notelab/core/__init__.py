"""Tier 0: the shared blocks every family builds on (torch only)."""

from notelab.core.checkpoint import PretrainedMixin, load_state_into, load_weights, save_weights
from notelab.core.config import config_from_dict, config_to_dict, load_json, save_config
from notelab.core.ema import EMA
from notelab.core.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    NotelabError,
    ShapeError,
    TrainingDivergedError,
    unknown_name,
)
from notelab.core.runtime import autocast, autocast_dtype, get_device, seed_everything
from notelab.core.tensor import append_dims

__all__ = [
    "EMA",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "NotelabError",
    "PretrainedMixin",
    "ShapeError",
    "TrainingDivergedError",
    "append_dims",
    "autocast",
    "autocast_dtype",
    "config_from_dict",
    "config_to_dict",
    "get_device",
    "load_json",
    "load_state_into",
    "load_weights",
    "save_config",
    "save_weights",
    "seed_everything",
    "unknown_name",
]
