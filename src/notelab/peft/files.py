"""Adapters on disk in Hugging Face PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT's tensor names are the module path under ``base_model.model.`` with the adapter name removed::

    ours   base_model.layers.0.self_attn.q_proj.lora_A.default.weight       (a notelab Llama)
    PEFT   base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight  (transformers' LlamaForCausalLM)
    ours   base_model.embed_tokens.prompt_embeddings.default   ->   PEFT   prompt_embeddings
    ours   prefix_encoders.default (MLP output)                ->   PEFT   prompt_embeddings

A module path maps to the peer's by one of :data:`NAME_MAPS` (the only key mapping): ``identity`` for a
model with the peer's own names (a transformers model adapted by notelab), ``hf-causal-lm`` for notelab's
Llama, whose names are transformers' without the ``model.`` prefix of the decoder stack.

Prefix tuning's table ``P`` (n, n_layers * 2 * kv_dim) has the same layout on both sides, but not the same
positions: PEFT hands ``P`` to transformers as ``past_key_values``, so the prompt runs at positions
``n .. n+T-1`` after the prefix (Li & Liang's layout), while notelab's ``KVPrefix`` keeps the prompt at
``0 .. T-1``. Under RoPE (Su et al. 2021) a score depends on the angle between query and key only,
``<R_{t+n} q, p> = <R_t q, R_{-n} p>``, so the file's prefix keys are rotated by ``-n`` positions on load and
``+n`` on save (values unchanged): identical attention, hence identical logits. A base without RoPE
frequencies (``inv_freq``) is left as is.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from notelab.core.checkpoint import load_weights, save_weights
from notelab.core.config import load_json
from notelab.core.errors import CheckpointError, ConfigError, unknown_name
from notelab.core.io import atomic_dir
from notelab.core.rope import apply_rope, rope_cos_sin
from notelab.peft.config import (
    AdapterConfig,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    config_from_json,
    config_to_json,
)
from notelab.peft.model import PeftModel
from notelab.peft.tuners import ADAPTER_KEYS

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
ROOT = "base_model.model."


def _hf_causal_lm(path: str) -> str:
    return path if path == "lm_head" or path.startswith("lm_head.") else "model." + path


def _hf_causal_lm_inverse(path: str) -> str:
    return path.removeprefix("model.")


# name -> (ours -> file, file -> ours), module paths only
NAME_MAPS: dict[str, tuple[Callable[[str], str], Callable[[str], str]]] = {
    "identity": (lambda p: p, lambda p: p),
    "hf-causal-lm": (_hf_causal_lm, _hf_causal_lm_inverse),
}


def _split(key: str) -> tuple[str, str, str, str] | None:
    """``module.path.lora_A.name.weight`` -> (module path, adapter key, adapter name, tail)."""
    parts = key.split(".")
    for i, p in enumerate(parts):
        if p in ADAPTER_KEYS and i + 1 < len(parts):
            return ".".join(parts[:i]), p, parts[i + 1], ".".join(parts[i + 2 :])
    return None


def _split_file(key: str) -> tuple[str, str, str] | None:
    """``module.path.lora_A.weight`` (PEFT's key without the root, no adapter name) -> (path, adapter key, tail)."""
    parts = key.split(".")
    for i, p in enumerate(parts):
        if p in ADAPTER_KEYS:
            return ".".join(parts[:i]), p, ".".join(parts[i + 1 :])
    return None


def adapter_tensors(model: PeftModel, name: str, names: str = "identity") -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors under PEFT's names (module docstring)."""
    to_file = _name_map(names)[0]
    out: dict[str, torch.Tensor] = {}
    for key, t in model.base_model.state_dict().items():
        s = _split(key)
        if s is None or s[2] != name:
            continue
        path, kind, _, tail = s
        if kind == "prompt_embeddings":
            out["prompt_embeddings"] = t
            continue
        out[ROOT + ".".join(x for x in (to_file(path), kind, tail) if x)] = t
    if name in model.prefix_encoders:
        out["prompt_embeddings"] = prefix_table_shift(model, name, model.prefix_encoders[name].table().detach(), +1)
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def prefix_table_shift(model: PeftModel, name: str, table: torch.Tensor, sign: int) -> torch.Tensor:
    """Prefix ``name``'s table with its keys rotated by ``sign * n`` RoPE positions (module docstring): ``+1`` turns
    notelab's table into PEFT's, ``-1`` PEFT's into notelab's. Unchanged when the base has no RoPE frequencies."""
    inv_freq = getattr(model.base_model, "inv_freq", None)
    if not isinstance(inv_freq, torch.Tensor) or inv_freq.numel() == 0:
        return table
    enc = model.prefix_encoders[name]
    n = table.shape[0]
    t = table.reshape(n, enc.n_layers, 2, enc.n_kv_heads, enc.head_dim).clone()
    cos, sin = rope_cos_sin(torch.full((n,), sign * n, device=table.device), inv_freq.float())
    keys = t[:, :, 0].float().permute(1, 2, 0, 3)  # (layers, Hkv, n, D), rotated in float32
    t[:, :, 0] = apply_rope(keys, cos, sin).permute(2, 0, 1, 3).to(t.dtype)
    return t.reshape(table.shape)


def _name_map(names: str) -> tuple[Callable[[str], str], Callable[[str], str]]:
    if names not in NAME_MAPS:
        raise unknown_name("adapter name map", names, NAME_MAPS)
    return NAME_MAPS[names]


def save_adapter(
    model: PeftModel, path: str | os.PathLike, adapter_name: str | None = None, *, names: str = "identity",
    base_model_name_or_path: str | None = None,
) -> Path:  # fmt: skip
    """Write adapter ``adapter_name`` (default: the active one) to folder ``path`` in PEFT's layout, atomically."""
    name = adapter_name or model.active_adapter
    if name not in model.peft_config:
        raise ConfigError(f"unknown adapter {name!r}; known: {', '.join(sorted(model.peft_config))}")
    config = model.peft_config[name]
    tensors = adapter_tensors(model, name, names)
    meta = {**config_to_json(config), "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
            "inference_mode": True}  # fmt: skip
    if isinstance(config, LoraConfig):
        meta.update(bias="none", fan_in_fan_out=False)
    if isinstance(config, PromptTuningConfig):
        meta.update(token_dim=tensors["prompt_embeddings"].shape[1], num_transformer_submodules=1)
    if isinstance(config, PrefixTuningConfig):
        enc = model.prefix_encoders[name]
        # The file holds P itself (as PEFT saves it), so the loaded adapter has no projection.
        meta.update(prefix_projection=False, num_layers=enc.n_layers, token_dim=enc.n_kv_heads * enc.head_dim,
                    num_attention_heads=enc.n_kv_heads, num_transformer_submodules=1)  # fmt: skip
    path = Path(path)
    with atomic_dir(path) as tmp:
        save_weights(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_adapter_config(path: str | os.PathLike) -> AdapterConfig:
    path = Path(path)
    try:
        data = load_json(path / CONFIG_FILE)
    except ConfigError as e:
        raise CheckpointError(str(e)) from e
    return config_from_json(data, str(path / CONFIG_FILE))


def load_adapter(
    model: PeftModel | torch.nn.Module, path: str | os.PathLike, adapter_name: str = "default", *, names: str = "auto"
) -> PeftModel:
    """Add the adapter in folder ``path`` (PEFT's layout, ours or PEFT's) to ``model`` as ``adapter_name``.

    ``model``: a PeftModel (the adapter is added) or a plain base model (wrapped). ``names``: a key of
    :data:`NAME_MAPS`, or ``auto`` (the one under which every module path of the file exists in the model).
    Names and shapes are checked before anything is copied: a file for another base shape is a
    :class:`CheckpointError` naming the shape expected and the shape found.
    """
    path = Path(path)
    config = read_adapter_config(path)
    if not (path / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{path}: expected {WEIGHTS_FILE}, found none")
    state = load_weights(path / WEIGHTS_FILE)
    base = model.base_model if isinstance(model, PeftModel) else model
    names = _pick_names(base, state, names, path)
    if isinstance(config, PrefixTuningConfig):
        config.prefix_projection = False
    peft = model if isinstance(model, PeftModel) else PeftModel(model, config, adapter_name)
    if peft is model:
        peft.add_adapter(adapter_name, config)
    # PEFT saves the whole base embedding beside an adapted embedding (save_embedding_layers); it replaces ours.
    saved_base = {k: state.pop(k) for k in list(state) if ".base_layer." in k and k.startswith(ROOT)}
    own = dict(peft.base_model.named_parameters())
    from_file = _name_map(names)[1]
    for k, t in saved_base.items():
        mod, _, tail = k.removeprefix(ROOT).rpartition(".base_layer.")
        target = own.get(f"{from_file(mod)}.base_layer.{tail}")
        if target is None or target.shape != t.shape:
            want = "no such tensor" if target is None else f"shape {tuple(target.shape)}"
            raise CheckpointError(f"{path / WEIGHTS_FILE}: {k}: the model has {want}, the file {tuple(t.shape)}")
        with torch.no_grad():
            target.copy_(t.to(target.dtype))
    expected = adapter_tensors(peft, adapter_name, names)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path / WEIGHTS_FILE}: tensors do not match the adapter's config: missing "
                              f"{missing[:2]}, unexpected {unexpected[:2]}")  # fmt: skip
    for k, t in state.items():
        if t.shape != expected[k].shape:
            raise CheckpointError(f"{path / WEIGHTS_FILE}: {k}: the model expects shape {tuple(expected[k].shape)}"
                                  f"{_layout(peft, adapter_name, k)}, the file has {tuple(t.shape)} (an adapter for "
                                  "another base?)")  # fmt: skip
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path / WEIGHTS_FILE}: {k}: expected finite values, found NaN/inf")
    _copy_in(peft, adapter_name, state, names)
    peft.set_adapter(adapter_name)
    return peft


def _layout(peft: PeftModel, name: str, key: str) -> str:
    """What a prefix table's width is made of, for an error message ("" for other tensors)."""
    if key != "prompt_embeddings" or name not in peft.prefix_encoders:
        return ""
    e = peft.prefix_encoders[name]
    return f" (virtual tokens, layers {e.n_layers} x 2 x kv heads {e.n_kv_heads} x head dim {e.head_dim})"


def _pick_names(base: torch.nn.Module, state: dict[str, torch.Tensor], names: str, path: Path) -> str:
    if names != "auto":
        _name_map(names)
        return names
    paths = {s[0] for k in state if k.startswith(ROOT) and (s := _split_file(k.removeprefix(ROOT))) is not None}
    own = {n for n, _ in base.named_modules()}
    for candidate, (_, from_file) in NAME_MAPS.items():
        if all(from_file(p) in own for p in paths):
            return candidate
    raise CheckpointError(f"{path}: the adapter's modules (e.g. {sorted(paths)[:1]}) are not in the model under "
                          f"any name map ({', '.join(NAME_MAPS)})")  # fmt: skip


@torch.no_grad()
def _copy_in(peft: PeftModel, name: str, state: dict[str, torch.Tensor], names: str) -> None:
    from_file = _name_map(names)[1]
    own = dict(peft.base_model.named_parameters())
    for k, t in state.items():
        if k == "prompt_embeddings":
            if name in peft.prefix_encoders:
                peft.prefix_encoders[name].embedding.copy_(prefix_table_shift(peft, name, t, -1))
                continue
            target = next(p for n, p in own.items() if n.endswith(f"prompt_embeddings.{name}"))
        else:
            path, kind, tail = _split_file(k.removeprefix(ROOT))  # type: ignore[misc]
            target = own[".".join(x for x in (from_file(path), kind, name, tail) if x)]
        target.copy_(t.to(target.dtype))


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file (names a frozen base in a run without copying it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
