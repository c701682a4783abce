"""Build and load the online action detectors (OadTR, TRN, LSTM / GRU, a causal Transformer) and check a model
against the streams it is given."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from notelab.core.errors import CheckpointError, DataError, ShapeError, unknown_name
from notelab.data.streams import StreamSet
from notelab.oad.config import CausalTransformerConfig, OadTRConfig, RNNDetectorConfig, TRNConfig
from notelab.oad.oadtr import CausalTransformer, OadTR
from notelab.oad.trn import TRN, RNNDetector

MODELS = ("oadtr", "trn", "lstm", "gru", "transformer")
_MODEL_CLASSES: dict[str, tuple[type[nn.Module], Any]] = {
    "oadtr": (OadTR, OadTRConfig),
    "transformer": (CausalTransformer, CausalTransformerConfig),
    "trn": (TRN, TRNConfig),
    "lstm": (RNNDetector, RNNDetectorConfig),
    "gru": (RNNDetector, RNNDetectorConfig),
}
_BY_TYPE = {cls.model_type: cls for cls, _ in _MODEL_CLASSES.values()}


def model_config(name: str, streams: StreamSet, preset: str = "small", **overrides: Any) -> Any:
    """The config of model ``name`` for ``streams`` (feature size, classes, ambiguous class) at ``preset``."""
    if name not in _MODEL_CLASSES:
        raise unknown_name("model", name, MODELS)
    data = {"d_in": streams.feature_dim, "n_classes": streams.n_classes, "ambiguous": streams.ambiguous}
    if name in ("lstm", "gru"):
        data["cell"] = name
    return _MODEL_CLASSES[name][1].from_name(preset, **{**data, **overrides})


def build_model(name: str, streams: StreamSet, preset: str = "small", seed: int = 0, **overrides: Any) -> nn.Module:
    cls = _MODEL_CLASSES[name][0] if name in _MODEL_CLASSES else None
    config = model_config(name, streams, preset, **overrides)
    torch.manual_seed(seed)
    return cls(config)  # type: ignore[misc]


def load_detector(path: str | os.PathLike, device: str = "cpu") -> nn.Module:
    """Any detector saved with ``save_pretrained``, chosen by the ``model_type`` of its config.json."""
    path = Path(path)
    try:
        kind = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: expected a detector folder with config.json ({e})") from e
    if kind not in _BY_TYPE:
        raise CheckpointError(f"{path}: expected a model_type among {sorted(_BY_TYPE)}, got {kind!r}")
    return _BY_TYPE[kind].from_pretrained(path, device=device)


def check_compatible(model: nn.Module, streams: StreamSet) -> None:
    """Features and classes of ``streams`` must be the model's; a mismatch is one clear line."""
    c = model.config
    if streams.feature_dim != c.d_in:
        raise ShapeError(
            f"{streams.name}: the model expects {c.d_in}-d frame features, the data has {streams.feature_dim}"
        )
    if streams.n_classes != c.n_classes:
        raise ShapeError(f"{streams.name}: the model has {c.n_classes} classes, the labels have {streams.n_classes}")
    if streams.ambiguous != c.ambiguous:
        raise DataError(f"{streams.name}: the model's ambiguous class is {c.ambiguous}, the data's {streams.ambiguous}")
