"""Checkpoints as ``config.json`` + ``model.safetensors``; never pickle.

Layout of a model directory (the Hugging Face convention)::

    dir/
      config.json          {"model_type": ..., <dataclass fields>}
      model.safetensors    the state dict, tied (shared) tensors stored once

Every write is atomic and durable (``notelab.core.io``), and every read checks the file against
the model it is loaded into (names, shapes, dtypes, finite weights), raising
:class:`CheckpointError` with a one-line reason.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from notelab.core.config import config_from_dict, load_json, save_config
from notelab.core.errors import CheckpointError, ConfigError
from notelab.core.io import atomic_path
from notelab.core.limits import allow_large_models, allowed_large, check_size

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

M = TypeVar("M", bound="PretrainedMixin")


def _dedupe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop later names of tensors that share storage (tied weights); safetensors refuses them."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    out = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and key in seen:
            continue
        seen[key] = name
        out[name] = t.detach().contiguous().cpu()
    return out


def save_weights(
    state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write a state dict to a safetensors file atomically."""
    with atomic_path(path) as tmp:
        save_file(_dedupe(state), str(tmp), metadata=metadata)


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing, truncated or corrupt file is a :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"expected weights at {path}, found no such file")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from e


# Floating dtypes a weight may be stored in for a floating parameter of another of them: the usual
# half / full precision conversions. float64 (or an integer) where the model has float32 or bf16 is
# a mistake upstream, refused rather than silently rounded.
CASTABLE_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def dtype_compatible(own: torch.dtype, stored: torch.dtype) -> bool:
    """Whether a tensor stored as ``stored`` may be loaded into one of dtype ``own`` (see ``CASTABLE_FLOATS``)."""
    return own == stored or (own in CASTABLE_FLOATS and stored in CASTABLE_FLOATS)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def load_state_into(module: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy ``state`` into ``module``, checking names, shapes, dtypes and finiteness first.

    A key the module has but ``state`` lacks is accepted only when it is tied to a key that is
    present (the file stores shared tensors once). A stored dtype must equal the module's, or both
    must be among float16 / bfloat16 / float32 (then it is cast). A parameter holding NaN or
    infinity is refused: such weights come only from a diverged run (which ``fit`` never saves) or
    a corrupt file, and every output of the model would be NaN. Buffers may hold infinities (masks).
    """
    own = module.state_dict()
    unexpected = sorted(set(state) - set(own))
    ptr_of = {k: (v.untyped_storage().data_ptr(), v.storage_offset()) for k, v in own.items()}
    present_ptrs = {ptr_of[k] for k in state if k in own}
    missing = sorted(k for k in set(own) - set(state) if ptr_of[k] not in present_ptrs)
    bad_shape = [
        f"{k}: config gives {tuple(own[k].shape)}, file has {tuple(state[k].shape)}"
        for k in state
        if k in own and own[k].shape != state[k].shape
    ]
    bad_dtype = [
        f"{k}: expected dtype {_dtype_name(own[k].dtype)}, got {_dtype_name(state[k].dtype)}"
        for k in state
        if k in own and not dtype_compatible(own[k].dtype, state[k].dtype)
    ]
    problems = []
    if bad_shape:
        problems.append("shape mismatch " + "; ".join(bad_shape[:3]) + (" ..." if len(bad_shape) > 3 else ""))
    if bad_dtype:
        problems.append("dtype mismatch " + "; ".join(bad_dtype[:3]) + (" ..." if len(bad_dtype) > 3 else ""))
    if missing:
        problems.append(f"missing {len(missing)} tensor(s) e.g. {missing[0]}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s) e.g. {unexpected[0]}")
    if problems:
        raise CheckpointError(f"{source}: weights do not match the model's config: " + "; ".join(problems))
    params = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    for name in sorted(params & set(state)):
        t = state[name]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{source}: expected finite weights, {name} holds {bad} NaN/inf value(s)")
    module.load_state_dict(state, strict=False)


class PretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` for an ``nn.Module`` built from a dataclass config.

    A subclass sets ``config_class`` and ``model_type`` and keeps its config in ``self.config``.
    """

    config_class: ClassVar[type]
    model_type: ClassVar[str]
    config: Any

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` under ``path`` (each atomically)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        assert isinstance(self, nn.Module)
        save_weights(self.state_dict(), path / WEIGHTS_NAME)
        save_config(self.config, path / CONFIG_NAME, model_type=self.model_type)

    @classmethod
    def load_config(cls, path: str | os.PathLike) -> Any:
        """Read and validate ``config.json`` of a checkpoint directory."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"expected a checkpoint directory at {path}, found none")
        try:
            data = load_json(path / CONFIG_NAME)
        except ConfigError as e:
            raise CheckpointError(str(e)) from e
        kind = data.pop("model_type", None)
        if kind != cls.model_type:
            raise CheckpointError(f"{path}: expected model_type {cls.model_type!r}, config.json has {kind!r}")
        try:
            return config_from_dict(cls.config_class, data)
        except ConfigError as e:
            raise CheckpointError(f"{path / CONFIG_NAME}: {e}") from e

    @classmethod
    def from_pretrained(
        cls: type[M], path: str | os.PathLike, device: str | torch.device = "cpu", allow_large: bool | None = None
    ) -> M:
        """Build the model from ``config.json`` and load ``model.safetensors`` into it.

        The config's size is checked (:func:`notelab.core.limits.check_size`) before anything is
        allocated; ``allow_large=True`` lifts the bound (``None``: that of the enclosing
        :func:`notelab.core.limits.allow_large_models`, default off). A model class may define
        ``classmethod num_parameters(config) -> int`` (or its config ``num_parameters()``) for an
        exact count by formula; otherwise the model is built on the ``meta`` device to count.
        """
        path = Path(path)
        config = cls.load_config(path)
        allow = allowed_large() if allow_large is None else allow_large
        check_size(config, model_cls=cls, allow_large=allow)
        with allow_large_models(allow):
            model = cls(config)  # type: ignore[call-arg]
        assert isinstance(model, nn.Module)
        load_state_into(model, load_weights(path / WEIGHTS_NAME), source=str(path / WEIGHTS_NAME))
        return model.to(device)  # type: ignore[return-value]
