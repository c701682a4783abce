"""Training checkpoints: safetensors and JSON only, written atomically as one directory.

Layout of ``out_dir/checkpoint/``::

    model.safetensors       the (unwrapped) model's state dict
    ema.safetensors         the EMA weights, when the run keeps an EMA
    optimizer.safetensors   every tensor of the optimizer state, as ``state.<param index>.<name>``
    trainer_state.json      {"step", "config", "world_size", "optimizer": {param_groups, non-tensor state}}

The whole directory is built and fsynced beside the old one and renamed over it
(``notelab.core.io.atomic_dir``), ``trainer_state.json`` written last: under any sequence of
crashes ``checkpoint/`` or ``.checkpoint.old/`` holds the last complete checkpoint, and
:func:`find_checkpoint` returns it (and removes temporaries that crashed writes left). Nothing is
pickled and ``torch.load`` is never called.

Reading checks every field of ``trainer_state.json`` and every optimizer tensor (name, shape,
dtype) before anything is copied. The optimizer's behaviour flags (``OPTIMIZER_FLAGS``, e.g.
``maximize``, ``foreach``, ``fused``) are the live optimizer's, never the file's: a file cannot
turn gradient descent into ascent.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from notelab.core.checkpoint import dtype_compatible, load_state_into, load_weights, save_weights
from notelab.core.config import config_to_dict, load_json
from notelab.core.errors import CheckpointError, ConfigError
from notelab.core.io import aside_path, atomic_dir, atomic_write_text, remove_stale_temps

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
    """The newest complete checkpoint in ``out_dir``, or ``None`` when there is none.

    ``checkpoint/`` when it holds a ``trainer_state.json``, else ``.checkpoint.old/`` (a crash
    between the two renames of a save leaves only that one). Temporaries of writes that died
    (``.checkpoint.*.tmp``, ``.<file>.*.tmp``) are removed; a complete checkpoint never is. A
    ``checkpoint/`` without its state file (not one this module wrote) is returned, so that
    :func:`load_checkpoint` says what is wrong rather than training restarting at step 0.
    """
    path = checkpoint_dir(out_dir)
    if path.parent.is_dir():
        remove_stale_temps(path.parent)
    aside = aside_path(path)
    for candidate in (path, aside):
        if (candidate / STATE_FILE).is_file():
            return candidate
    return path if path.is_dir() else None


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


# Flags that change what an optimizer computes or how, not hyper-parameters a schedule moves:
# always the live optimizer's own values.
OPTIMIZER_FLAGS = (
    "maximize",
    "foreach",
    "capturable",
    "differentiable",
    "fused",
    "amsgrad",
    "nesterov",
    "decoupled_weight_decay",
)
# Keys other code adds to a param group (torch's LR schedulers): kept when the live group lacks them.
EXTRA_GROUP_KEYS = ("initial_lr",)
# Flags that also change which state tensors exist: a checkpoint written with another value cannot be resumed.
STATE_LAYOUT_FLAGS = ("amsgrad",)
# Optimizers whose state tensors are elementwise (the parameter's shape) or scalars (``step``).
ELEMENTWISE_OPTIMIZERS = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.SGD,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adadelta,
    torch.optim.Rprop,
)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_group_value(key: str, own: Any, value: Any, where: str) -> Any:
    """A param-group value from the file, checked against the live optimizer's value of ``key``."""
    if isinstance(own, bool) or own is None:
        ok = isinstance(value, bool) or value is None
    elif isinstance(own, (int, float, torch.Tensor)):
        ok = _is_number(value)
    elif isinstance(own, (tuple, list)):
        ok = isinstance(value, list) and len(value) == len(own) and all(_is_number(v) for v in value)
        value = tuple(value) if ok and isinstance(own, tuple) else value
    elif isinstance(own, str):
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise CheckpointError(f"{where}.{key}: expected a value like the optimizer's {own!r}, got {value!r}")
    return value


def _restore_groups(own_groups: list[dict[str, Any]], groups: Any, source: str) -> list[dict[str, Any]]:
    """The file's param groups checked key by key; flags are the live optimizer's."""
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise CheckpointError(f"{source}: optimizer.param_groups: expected a list of objects, got {groups!r:.80}")
    own_sizes = [len(g["params"]) for g in own_groups]
    sizes = [len(g["params"]) if isinstance(g.get("params"), list) else None for g in groups]
    if own_sizes != sizes:
        raise CheckpointError(f"{source}: optimizer has param groups of sizes {own_sizes}, checkpoint has {sizes}")
    restored = []
    for i, (own, group) in enumerate(zip(own_groups, groups)):
        where = f"{source}: optimizer.param_groups[{i}]"
        unknown = sorted(set(group) - set(own) - set(EXTRA_GROUP_KEYS))
        if unknown:
            raise CheckpointError(f"{where}: unknown key(s) {', '.join(unknown)}; the optimizer has {', '.join(own)}")
        params = group["params"]
        if params != own["params"]:  # optimizer_to_flat numbers the parameters in order
            raise CheckpointError(f"{where}.params: expected the indices {own['params']!r:.80}, got {params!r:.80}")
        new = {}
        for key, own_value in own.items():
            if key == "params":
                new[key] = params
            elif key in OPTIMIZER_FLAGS or key not in group:
                if key in STATE_LAYOUT_FLAGS and key in group and group[key] != own_value:
                    saved = group[key]
                    raise CheckpointError(f"{where}.{key}: the optimizer has {own_value!r}, the checkpoint {saved!r}")
                new[key] = own_value
            else:
                new[key] = _check_group_value(key, own_value, group[key], where)
        for key in EXTRA_GROUP_KEYS:
            if key in group and key not in own:
                new[key] = _check_group_value(key, 0.0, group[key], where)
        restored.append(new)
    return restored


def _check_state_tensor(name: str, t: torch.Tensor, param: torch.Tensor, elementwise: bool, source: str) -> None:
    if t.numel() == 1 and t.dim() <= 1:  # scalars: Adam's step, and the like
        if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
            raise CheckpointError(f"{source}: {name}: expected a numeric scalar, got dtype {t.dtype}")
        return
    if elementwise and t.shape != param.shape:
        raise CheckpointError(
            f"{source}: {name}: expected shape {tuple(param.shape)} (its parameter's), got {tuple(t.shape)}"
        )
    if not dtype_compatible(param.dtype, t.dtype):
        raise CheckpointError(
            f"{source}: {name}: expected dtype {str(param.dtype).removeprefix('torch.')} (its parameter's), "
            f"got {str(t.dtype).removeprefix('torch.')}"
        )


def optimizer_from_flat(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any], source: str
) -> None:
    """Load what :func:`optimizer_to_flat` wrote into ``optimizer`` (same params, same order).

    Every group value and state tensor is checked first (:class:`CheckpointError` naming it);
    ``OPTIMIZER_FLAGS`` keep the live optimizer's values.
    """
    own_groups = optimizer.state_dict()["param_groups"]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not isinstance(meta, dict):
        raise CheckpointError(f"{source}: optimizer: expected an object, got {meta!r:.80}")
    restored = _restore_groups(own_groups, meta.get("param_groups", []), source)
    by_index = dict(enumerate(params))  # state_dict() numbers the parameters group after group
    elementwise = isinstance(optimizer, ELEMENTWISE_OPTIMIZERS)
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        parts = name.split(".", 2)
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit() or int(parts[1]) not in by_index:
            raise CheckpointError(
                f"{source}: unexpected optimizer tensor {name!r} (expected state.<param index>.<name>)"
            )
        pid = int(parts[1])
        _check_state_tensor(name, value, by_index[pid], elementwise, source)
        state.setdefault(pid, {})[parts[2]] = value
    scalars = meta.get("state", {})
    if not isinstance(scalars, dict):
        raise CheckpointError(f"{source}: optimizer.state: expected an object, got {scalars!r:.80}")
    for pid, extra in scalars.items():
        if not (isinstance(pid, str) and pid.isdigit() and int(pid) in by_index and isinstance(extra, dict)):
            raise CheckpointError(f"{source}: optimizer.state.{pid}: expected a parameter index and an object")
        state.setdefault(int(pid), {}).update(extra)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": restored})
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{source}: optimizer state does not match the model ({e})") from e


def check_trainer_state(state: dict[str, Any], where: str) -> int:
    """Check the fields of ``trainer_state.json``; returns the step."""
    version = state.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise CheckpointError(f"{where}: expected format_version {FORMAT_VERSION}, got {version!r}")
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{where}: expected a non-negative integer 'step', got {step!r}")
    if not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{where}: expected an object 'config', got {state.get('config')!r:.80}")
    if not isinstance(state.get("optimizer"), dict):
        raise CheckpointError(f"{where}: expected an object 'optimizer', got {state.get('optimizer')!r:.80}")
    world = state.get("world_size", 1)
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise CheckpointError(f"{where}: expected a positive integer 'world_size', got {world!r}")
    seconds = state.get("seconds", 0.0)
    if not _is_number(seconds) or seconds < 0:
        raise CheckpointError(f"{where}: expected a non-negative number 'seconds', got {seconds!r}")
    return step


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
        atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=2) + "\n")  # last: marks it complete
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
    step = check_trainer_state(state, str(path / STATE_FILE))
    load_state_into(model, load_weights(path / MODEL_FILE), source=str(path / MODEL_FILE))
    if ema_model is not None:
        if (path / EMA_FILE).is_file():
            load_state_into(ema_model, load_weights(path / EMA_FILE), source=str(path / EMA_FILE))
        else:
            ema_model.load_state_dict(model.state_dict())
    if optimizer is not None:
        tensors = load_weights(path / OPTIMIZER_FILE)
        optimizer_from_flat(optimizer, tensors, state["optimizer"], source=str(path / OPTIMIZER_FILE))
    return LoadedCheckpoint(path=path, step=step, state=state)
