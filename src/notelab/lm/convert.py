"""Hugging Face ``LlamaForCausalLM`` checkpoints <-> :class:`notelab.lm.Llama` (all key renaming lives here).

A Hugging Face checkpoint directory::

    config.json                          {"architectures": ["LlamaForCausalLM"], "hidden_size": ..., ...}
    model.safetensors                    or, sharded:
    model.safetensors.index.json         {"metadata": {"total_size": N}, "weight_map": {name: shard}}
    model-00001-of-00002.safetensors ...

Tensor names are ours with a ``model.`` prefix, except ``lm_head.weight`` (absent when the
embeddings are tied). Config fields map one to one::

    hidden_size -> dim          intermediate_size -> ffn_hidden_dim   num_hidden_layers -> n_layers
    num_attention_heads -> n_heads   num_key_value_heads -> n_kv_heads   rms_norm_eps -> norm_eps
    rope_theta -> rope_theta    rope_scaling {"rope_type": "llama3", ...} -> RopeScaling
    max_position_embeddings -> max_seq_len   tie_word_embeddings -> tie_embeddings

Only safetensors are read (never pickled ``pytorch_model.bin``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from notelab.core.checkpoint import save_weights
from notelab.core.errors import CheckpointError, ConfigError
from notelab.core.io import atomic_write_text
from notelab.core.rope import RopeScaling
from notelab.lm.config import LlamaConfig
from notelab.lm.model import Llama

INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "model.safetensors"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def hf_to_ours(name: str) -> str | None:
    """Our parameter name for a Hugging Face one (``None``: a tensor we do not keep)."""
    if name.endswith("rotary_emb.inv_freq"):  # old checkpoints store the RoPE table; we recompute it
        return None
    return name.removeprefix("model.")


def ours_to_hf(name: str) -> str:
    """The Hugging Face parameter name for one of ours."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def _rope_from_hf(cfg: dict[str, Any], where: str) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from legacy ``rope_theta`` / ``rope_scaling`` keys or transformers 5's ``rope_parameters``."""
    params = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise CheckpointError(f"{where}: expected RoPE type 'default' or 'llama3', got {kind!r}")
    try:
        scaling = RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise CheckpointError(f"{where}: llama3 rope scaling lacks the key {e}") from e
    return theta, scaling


def config_from_hf(cfg: dict[str, Any], where: str = "config.json") -> LlamaConfig:
    """A :class:`LlamaConfig` from a Hugging Face Llama ``config.json`` dict; anything else is a CheckpointError."""
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") != "llama" and "LlamaForCausalLM" not in archs:
        raise CheckpointError(
            f"{where}: expected a Llama checkpoint (model_type 'llama'), got model_type {cfg.get('model_type')!r}"
        )
    unsupported = {
        "attention_bias": bool(cfg.get("attention_bias", False)),
        "mlp_bias": bool(cfg.get("mlp_bias", False)),
        "hidden_act": cfg.get("hidden_act", "silu") != "silu",
        "pretraining_tp": (cfg.get("pretraining_tp") or 1) != 1,
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise CheckpointError(f"{where}: unsupported Llama variant ({', '.join(f'{k}={cfg.get(k)!r}' for k in bad)})")
    try:
        heads, dim = int(cfg["num_attention_heads"]), int(cfg["hidden_size"])
        head_dim = cfg.get("head_dim") or dim // heads
        if head_dim * heads != dim:
            raise CheckpointError(f"{where}: expected head_dim = hidden_size / heads = {dim // heads}, got {head_dim}")
        theta, scaling = _rope_from_hf(cfg, where)
        return LlamaConfig(
            vocab_size=int(cfg["vocab_size"]),
            dim=dim,
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            ffn_hidden_dim=int(cfg["intermediate_size"]),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )
    except KeyError as e:
        raise CheckpointError(f"{where}: expected the Llama config key {e}, found none") from e
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from e


def config_to_hf(config: LlamaConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The ``config.json`` dict transformers' ``LlamaForCausalLM`` loads (legacy rope keys, read by 4.x and 5.x)."""
    if (config.norm, config.mlp, config.pos) != ("rmsnorm", "swiglu", "rope"):
        raise CheckpointError(
            f"to_hf: only the Llama block (rmsnorm, swiglu, rope) has a LlamaForCausalLM layout, "
            f"got ({config.norm}, {config.mlp}, {config.pos})"
        )
    s = config.rope_scaling
    rope_scaling = None
    if s is not None:
        rope_scaling = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "torch_dtype": str(dtype).removeprefix("torch."),  # transformers < 4.56
        "dtype": str(dtype).removeprefix("torch."),
    }


def _shard_files(path: Path) -> dict[str, list[str]]:
    """{shard file: [tensor names]} of a checkpoint directory, single file or sharded."""
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: expected JSON with a 'weight_map', could not read it ({e})") from e
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, []).append(name)
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise CheckpointError(
                f"{path}: {len(missing)} shard(s) named in {INDEX_NAME} are missing, e.g. {missing[0]}"
            )
        return shards
    if (path / WEIGHTS_NAME).is_file():
        return {WEIGHTS_NAME: []}
    raise CheckpointError(f"{path}: expected {WEIGHTS_NAME} or {INDEX_NAME}, found neither")


def _read_state(path: Path, dtype: torch.dtype | None, device: str | torch.device) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for shard in _shard_files(path):
        try:
            with safe_open(str(path / shard), framework="pt", device=str(device)) as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    ours = hf_to_ours(name)
                    if ours is not None:
                        t = f.get_tensor(name)
                        state[ours] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path / shard}: not a readable safetensors file ({e})") from e
    return state


def from_hf(path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Llama:
    """Load a Hugging Face ``LlamaForCausalLM`` directory as :class:`Llama` (weights in ``dtype`` or as stored)."""
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"expected a Hugging Face checkpoint directory with config.json at {path}, found none")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from e
    config = config_from_hf(cfg, str(cfg_path))
    state = _read_state(path, dtype, device)
    with torch.device("meta"):
        model = Llama(config)
    own = model.state_dict()
    tied = {"lm_head.weight"} if config.tie_embeddings else set()
    missing = sorted(set(own) - set(state) - tied)
    unexpected = sorted(set(state) - set(own))
    bad = [f"{k}: config gives {tuple(own[k].shape)}, file has {tuple(state[k].shape)}"
           for k in state if k in own and own[k].shape != state[k].shape]  # fmt: skip
    problems = ([f"shape mismatch {bad[0]}"] if bad else []) + (
        [f"missing {len(missing)} tensor(s) e.g. {ours_to_hf(missing[0])}"] if missing else []
    )
    problems += [f"unexpected {len(unexpected)} tensor(s) e.g. {ours_to_hf(unexpected[0])}"] if unexpected else []
    if problems:
        raise CheckpointError(f"{path}: weights do not match config.json: " + "; ".join(problems))
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.reset_rope()
    return model.eval()


def to_hf(
    model: Llama,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5_000_000_000,
) -> None:
    """Write ``model`` as a Hugging Face ``LlamaForCausalLM`` directory, sharded above ``max_shard_bytes``.

    Each file is written atomically and config.json last, so a directory with a config.json is complete.
    """
    path = Path(path)
    first = next(iter(model.parameters()))
    dtype = dtype or first.dtype
    hf_config = config_to_hf(model.config, dtype)
    state = {ours_to_hf(k): v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    path.mkdir(parents=True, exist_ok=True)
    for stale in [path / "config.json", path / INDEX_NAME, path / WEIGHTS_NAME, *path.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_weights(shards[0], path / WEIGHTS_NAME, metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_weights(shard, path / name, metadata=meta)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write_text(path / INDEX_NAME, json.dumps(index, indent=2) + "\n")
    atomic_write_text(path / "config.json", json.dumps(hf_config, indent=2) + "\n")
