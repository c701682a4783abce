"""Training checkpoints: safetensors and JSON only, written atomically as one directory.

Layout of ``out_dir/checkpoint/``::

    model.safetensors       the (unwrapped) model's state dict
    ema.safetensors         the EMA weights, when the run keeps an EMA
    optimizer.safetensors   every tensor of the optimizer state, as ``state.<param index>.<name>``
    trainer_state.json      {"step", "config", "world_size", "optimizer": {param_groups, non-tensor state}}

The whole directory is built beside the old one and renamed over it (``notelab.core.io.atomic_dir``),
so a crash mid-write leaves the previous checkpoint intact. Nothing is pickled and ``torch.load``
is never called.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from notelab.core.checkpoint import load_state_into, load_weights, save_weights
from notelab.core.config import config_to_dict, load_json
from notelab.core.errors import CheckpointError, ConfigError
from notelab.core.io import atomic_dir

CHECKPOINT_DIR = "checkpoint"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
FORMAT_VERSION = 1


def checkpoint_dir(out_dir: str | os.PathLike) -> Path:
    """Where ``fit`` keeps its checkpoint inside ``out_dir``."""
    return Path(out_dir) / CHECKPOINT_DIR


def find_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint in ``out_dir``, or ``None``.

    ``atomic_dir`` moves the old directory aside for an instant before renaming the new one in;
    a process killed in that instant leaves only ``.checkpoint.old``, which is then the latest.
    """
    path = checkpoint_dir(out_dir)
    if path.is_dir():
        return path
    aside = path.parent / f".{path.name}.old"
    return aside if (aside / STATE_FILE).is_file() else None


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into flat tensors and a JSON-ready rest."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    meta = {"param_groups": sd["param_groups"], "state": scalars}
    try:
        json.dumps(meta)
    except TypeError as e:
        raise CheckpointError(f"optimizer state: expected tensors or JSON values, got {e}") from e
    return tensors, meta


def optimizer_from_flat(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any], source: str
) -> None:
    """Load what :func:`optimizer_to_flat` wrote into ``optimizer`` (same params, same order)."""
    own_groups = optimizer.state_dict()["param_groups"]
    groups = meta.get("param_groups", [])
    own_sizes = [len(g["params"]) for g in own_groups]
    sizes = [len(g["params"]) for g in groups]
    if own_sizes != sizes:
        raise CheckpointError(f"{source}: optimizer has param groups of sizes {own_sizes}, checkpoint has {sizes}")
    # JSON turns tuples (betas) into lists; give each value back the type the optimizer uses.
    restored = []
    for own, group in zip(own_groups, groups):
        restored.append(
            {k: tuple(v) if isinstance(own.get(k), tuple) and isinstance(v, list) else v for k, v in group.items()}
        )
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, extra in meta.get("state", {}).items():
        state.setdefault(int(pid), {}).update(extra)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": restored})
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{source}: optimizer state does not match the model ({e})") from e


@dataclass
class LoadedCheckpoint:
    path: Path
    step: int
    state: dict[str, Any]  # trainer_state.json as read


def save_checkpoint(
    path: str | os.PathLike,
    *,
    step: int,
    config: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema_model: nn.Module | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a training checkpoint directory at ``path`` atomically; returns ``path``."""
    path = Path(path)
    tensors, opt_meta = optimizer_to_flat(optimizer)
    state = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "config": config_to_dict(config),
        "optimizer": opt_meta,
        **(extra or {}),
    }
    with atomic_dir(path) as tmp:
        save_weights(model.state_dict(), tmp / MODEL_FILE)
        if ema_model is not None:
            save_weights(ema_model.state_dict(), tmp / EMA_FILE)
        save_weights(tensors, tmp / OPTIMIZER_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    return path


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    ema_model: nn.Module | None = None,
) -> LoadedCheckpoint:
    """Restore ``model`` (and optimizer, EMA) from a checkpoint directory written by :func:`save_checkpoint`.

    Shapes and names are checked before anything is copied; a mismatch is a :class:`CheckpointError`.
    An EMA asked for but absent from the checkpoint starts from the restored model weights.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"expected a training checkpoint directory at {path}, found none")
    try:
        state = load_json(path / STATE_FILE)
    except ConfigError as e:
        raise CheckpointError(str(e)) from e
    step = state.get("step")
    if not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path / STATE_FILE}: expected a non-negative integer 'step', got {step!r}")
    load_state_into(model, load_weights(path / MODEL_FILE), source=str(path / MODEL_FILE))
    if ema_model is not None:
        if (path / EMA_FILE).is_file():
            load_state_into(ema_model, load_weights(path / EMA_FILE), source=str(path / EMA_FILE))
        else:
            ema_model.load_state_dict(model.state_dict())
    if optimizer is not None:
        tensors = load_weights(path / OPTIMIZER_FILE)
        optimizer_from_flat(optimizer, tensors, state.get("optimizer", {}), source=str(path / OPTIMIZER_FILE))
    return LoadedCheckpoint(path=path, step=step, state=state)
