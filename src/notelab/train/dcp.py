"""Sharded training checkpoints: ``torch.distributed.checkpoint`` in safetensors files, state in JSON.

An FSDP run cannot gather its state on one rank (that is why it shards), so each rank writes its
own shards. Layout of ``out_dir/checkpoint/``::

    shard-0000<r+1>-model-00001-of-00001.safetensors   rank r's pieces of the model and AdamW state,
                                                        each with its offset in the whole tensor
                                                        (DCP's HuggingFaceStorageWriter, save_distributed)
    trainer_state.json                                 {"format": "dcp-safetensors", "step", "config",
                                                        "world_size", "optimizer": {"param_groups"}}

Tensors are keyed by their fully qualified names (``model.layers.0.mlp.up_proj.weight``,
``optim.layers.0.mlp.up_proj.weight.exp_avg``), not by rank, so a checkpoint written by ``N``
ranks loads at any world size, FSDP or not, one process included: DCP reads the pieces each new
shard needs (resharding). Nothing is pickled: the files are safetensors and JSON, and DCP's
reader rebuilds its plan from the safetensors headers.

Crash safety is ``notelab.core.io.atomic_dir``'s: rank 0 makes the temporary directory, every
rank writes its shards into it, rank 0 writes ``trainer_state.json`` last and renames the whole
directory over the previous checkpoint, which is never deleted before its successor is durable.
The ranks must share the file system (one host, or a shared mount).

fit re-derives every random number from (seed, step, micro-batch, rank) (``notelab.train.loop``),
so the step is the RNG state a resume needs.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from notelab.core.config import config_to_dict, load_json
from notelab.core.errors import CheckpointError, ConfigError
from notelab.core.io import atomic_dir, atomic_write_text
from notelab.train.state import (
    FORMAT_VERSION,
    OPTIMIZER_FLAGS,
    STATE_FILE,
    LoadedCheckpoint,
    _check_group_value,
    check_trainer_state,
)

FORMAT = "dcp-safetensors"
_PATH_BYTES = 4096  # the longest temporary path rank 0 can hand the other ranks


def is_sharded(path: str | os.PathLike) -> bool:
    """Whether the checkpoint directory ``path`` was written by :func:`save_sharded`."""
    try:
        state = json.loads((Path(path) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("format") == FORMAT


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict | None]:
    """Model and optimizer state keyed by parameter names; DTensor shards under FSDP, whole tensors without."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return get_model_state_dict(model), None
    return get_state_dict(model, optimizer)


def _check_tensors(tree: dict[str, Any], where: str) -> None:
    for key, value in tree.items():
        if isinstance(value, dict):
            _check_tensors(value, f"{where}.{key}")
        elif not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{where}.{key}: expected a tensor in the sharded state, got {type(value).__name__}")


def _share_path(path: Path | None) -> Path:
    """Rank 0's ``path`` on every rank (a byte tensor broadcast; no pickling)."""
    on_cuda = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    buf = torch.zeros(_PATH_BYTES, dtype=torch.uint8, device=device)
    if path is not None:
        raw = os.fsencode(path)
        if len(raw) >= _PATH_BYTES:
            raise ConfigError(f"checkpoint path: expected fewer than {_PATH_BYTES} bytes, got {len(raw)}")
        buf[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(device)
    dist.broadcast(buf, src=0)
    data = bytes(buf.cpu().tolist())
    return Path(os.fsdecode(data.rstrip(b"\0")))


def save_sharded(
    path: str | os.PathLike,
    *,
    step: int,
    config: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the sharded checkpoint ``path`` (module docstring); every rank calls it. Returns ``path``."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter, save

    path = Path(path)
    model_sd, optim_sd = _state_dicts(model, optimizer)
    assert optim_sd is not None
    tensors = {"model": model_sd, "optim": optim_sd["state"]}
    _check_tensors(tensors, "state")
    state = {
        "format_version": FORMAT_VERSION,
        "format": FORMAT,
        "step": step,
        "config": config_to_dict(config),
        "optimizer": {"param_groups": optim_sd["param_groups"]},
        **(extra or {}),
    }
    text = json.dumps(state, indent=2) + "\n"
    distributed = dist.is_initialized()
    if distributed and dist.get_rank() != 0:
        tmp = _share_path(None)
        save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp), save_distributed=True))
        dist.barrier()  # rank 0 has renamed the directory: the checkpoint is complete
        return path
    with atomic_dir(path) as tmp:
        if distributed:
            _share_path(tmp)
        # Returns once every rank's shards are written (DCP gathers the ranks' write results here).
        save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp), save_distributed=True))
        atomic_write_text(tmp / STATE_FILE, text)  # last: marks it complete
    if distributed:
        dist.barrier()
    return path


def _restored_groups(live: list[dict[str, Any]], saved: Any, source: str) -> list[dict[str, Any]]:
    """The live optimizer's param groups with the file's hyper-parameters (flags stay the live ones)."""
    if not isinstance(saved, list) or len(saved) != len(live) or not all(isinstance(g, dict) for g in saved):
        n = len(saved) if isinstance(saved, list) else type(saved).__name__
        raise CheckpointError(f"{source}: expected {len(live)} optimizer param groups, got {n}")
    groups = []
    for i, (own, group) in enumerate(zip(live, saved)):
        where = f"{source}: optimizer.param_groups[{i}]"
        if sorted(group.get("params", [])) != sorted(own["params"]):
            raise CheckpointError(
                f"{where}.params: expected the names {own['params']!r:.120}, got {group.get('params')!r:.120}"
            )
        new = dict(own)
        for key, value in group.items():
            if key in own and key != "params" and key not in OPTIMIZER_FLAGS:
                new[key] = _check_group_value(key, own[key], value, where)
        groups.append(new)
    return groups


def _reason(e: BaseException) -> str:
    """One line: the first rank's own error inside DCP's CheckpointException (which adds tracebacks)."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


def load_sharded(
    path: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> LoadedCheckpoint:
    """Restore ``model`` (and ``optimizer``) from :func:`save_sharded`'s directory, at any world size.

    ``model`` may be FSDP-sharded (every rank calls this) or a plain module in a single process.
    A missing or misshapen tensor is a :class:`CheckpointError` naming the directory.
    """
    from torch.distributed.checkpoint import HuggingFaceStorageReader, load
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = Path(path)
    try:
        state = load_json(path / STATE_FILE)
    except ConfigError as e:
        raise CheckpointError(str(e)) from e
    source = str(path / STATE_FILE)
    step = check_trainer_state(state, source)
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{source}: expected format {FORMAT!r}, got {state.get('format')!r}")
    model_sd, optim_sd = _state_dicts(model, optimizer)
    tensors: dict[str, Any] = {"model": model_sd}
    if optim_sd is not None:
        tensors["optim"] = optim_sd["state"]
    try:
        with warnings.catch_warnings():  # one process reading shards is what it is meant for, not a mistake
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            load(tensors, storage_reader=HuggingFaceStorageReader(str(path)))
    except (Exception, CheckpointException) as e:  # DCP's own type derives from BaseException
        raise CheckpointError(f"{path}: the sharded checkpoint does not match the model: {_reason(e)}") from e
    optim_state = None
    if optim_sd is not None:
        groups = _restored_groups(optim_sd["param_groups"], state["optimizer"].get("param_groups"), source)
        optim_state = {"state": tensors["optim"], "param_groups": groups}
    set_state_dict(
        model,
        [optimizer] if optimizer is not None else [],
        model_state_dict=tensors["model"],
        optim_state_dict=optim_state or {},
    )
    return LoadedCheckpoint(path=path, step=step, state=state)


def export_pretrained(checkpoint: str | os.PathLike, model: nn.Module, out: str | os.PathLike) -> Path:
    """Load a sharded checkpoint into the plain ``model`` (one process) and ``save_pretrained(out)`` it.

    The result is one ``config.json`` + ``model.safetensors`` directory, as every notelab model
    and Hugging Face's loaders read.
    """
    if not callable(getattr(model, "save_pretrained", None)):
        raise ConfigError(f"export_pretrained: expected a model with save_pretrained, got {type(model).__name__}")
    load_sharded(checkpoint, model=model)
    model.save_pretrained(out)
    return Path(out)
