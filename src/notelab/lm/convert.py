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

Only safetensors are read (never pickled ``pytorch_model.bin``). Everything read is untrusted:
config fields are type- and range-checked, the size is bounded before allocation, shard paths
must stay inside the directory, and weights are checked for name, shape, dtype and finiteness.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from notelab.core.checkpoint import CASTABLE_FLOATS, save_weights
from notelab.core.config import load_json
from notelab.core.errors import CheckpointError, ConfigError
from notelab.core.io import atomic_write_text
from notelab.core.limits import check_size
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


_MISSING = object()


def _short(value: Any, limit: int = 200) -> str:
    """``repr(value)``, cut to ``limit`` characters (a value from an untrusted file may be huge)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _field(cfg: dict[str, Any], key: str, kind: str, where: str, default: Any = _MISSING) -> Any:
    """``cfg[key]`` checked to be ``kind``: "int" (>= 1), "float" (finite, > 0), "bool" or "dict".

    ``default`` when the key is absent or null; without one that is an error."""
    value = cfg.get(key)
    if value is None:
        if default is _MISSING:
            raise CheckpointError(f"{where}: expected the Llama config key {key!r}, found none")
        return default
    is_int = isinstance(value, int) and not isinstance(value, bool)
    ok = {
        "int": is_int and value >= 1,
        "float": (is_int or isinstance(value, float)) and math.isfinite(value) and value > 0,
        "bool": isinstance(value, bool),
        "dict": isinstance(value, dict),
    }[kind]
    if not ok:
        expected = {
            "int": "an integer >= 1",
            "float": "a finite number > 0",
            "bool": "true or false",
            "dict": "an object",
        }
        raise CheckpointError(f"{where}: {key}: expected {expected[kind]}, got {_short(value)}")
    return float(value) if kind == "float" else value


def _rope_from_hf(cfg: dict[str, Any], where: str) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from legacy ``rope_theta`` / ``rope_scaling`` keys or transformers 5's ``rope_parameters``."""
    params = _field(cfg, "rope_scaling", "dict", where, None) or _field(cfg, "rope_parameters", "dict", where, {})
    theta = _field(params, "rope_theta", "float", where, None) or _field(cfg, "rope_theta", "float", where, 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise CheckpointError(f"{where}: expected RoPE type 'default' or 'llama3', got {_short(kind)}")
    scaling = RopeScaling(
        factor=_field(params, "factor", "float", f"{where}: rope_scaling"),
        low_freq_factor=_field(params, "low_freq_factor", "float", f"{where}: rope_scaling"),
        high_freq_factor=_field(params, "high_freq_factor", "float", f"{where}: rope_scaling"),
        original_max_position_embeddings=_field(
            params, "original_max_position_embeddings", "int", f"{where}: rope_scaling"
        ),
    )
    return theta, scaling


def config_from_hf(cfg: dict[str, Any], where: str = "config.json") -> LlamaConfig:
    """A :class:`LlamaConfig` from a Hugging Face Llama ``config.json`` dict; anything else is a CheckpointError.

    Every field used is type- and range-checked (one line naming it); nothing is coerced (``"4096"``
    or ``4096.5`` for ``hidden_size`` is an error, not 4096).
    """
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") != "llama" and not (isinstance(archs, list) and "LlamaForCausalLM" in archs):
        raise CheckpointError(
            f"{where}: expected a Llama checkpoint (model_type 'llama'), got model_type {_short(cfg.get('model_type'))}"
        )
    unsupported = {
        "attention_bias": cfg.get("attention_bias", False) not in (False, None),
        "mlp_bias": cfg.get("mlp_bias", False) not in (False, None),
        "hidden_act": cfg.get("hidden_act", "silu") != "silu",
        "pretraining_tp": cfg.get("pretraining_tp", 1) not in (1, None),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise CheckpointError(
            f"{where}: unsupported Llama variant ({', '.join(f'{k}={_short(cfg.get(k))}' for k in bad)})"
        )
    heads, dim = _field(cfg, "num_attention_heads", "int", where), _field(cfg, "hidden_size", "int", where)
    head_dim = _field(cfg, "head_dim", "int", where, dim // heads)
    if head_dim * heads != dim:
        raise CheckpointError(f"{where}: expected head_dim = hidden_size / heads = {dim // heads}, got {head_dim}")
    theta, scaling = _rope_from_hf(cfg, where)
    try:
        return LlamaConfig(
            vocab_size=_field(cfg, "vocab_size", "int", where),
            dim=dim,
            n_layers=_field(cfg, "num_hidden_layers", "int", where),
            n_heads=heads,
            n_kv_heads=_field(cfg, "num_key_value_heads", "int", where, heads),
            ffn_hidden_dim=_field(cfg, "intermediate_size", "int", where),
            norm_eps=_field(cfg, "rms_norm_eps", "float", where, 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_seq_len=_field(cfg, "max_position_embeddings", "int", where, 2048),
            tie_embeddings=_field(cfg, "tie_word_embeddings", "bool", where, False),
        )
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


def _inside(root: Path, name: Any, where: str) -> Path:
    """``root / name`` for a shard name that stays inside ``root``: no absolute path, ``..`` or outward symlink."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{where}: expected a shard file name, got {_short(name)}")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise CheckpointError(f"{where}: shard {_short(name)} leaves the checkpoint directory {root}")
    full = root / rel
    if not full.resolve().is_relative_to(root.resolve()):
        raise CheckpointError(f"{where}: shard {_short(name)} is a link that leaves the checkpoint directory {root}")
    return full


def _shard_files(path: Path) -> dict[str, list[str]]:
    """{shard file: [tensor names]} of a checkpoint directory, single file or sharded; every shard inside ``path``."""
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = load_json(index).get("weight_map")
        except ConfigError as e:
            raise CheckpointError(str(e)) from e
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: expected a non-empty object 'weight_map' (tensor -> shard file)")
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            _inside(path, shard, str(index))
            shards.setdefault(shard, []).append(name)
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise CheckpointError(
                f"{path}: {len(missing)} shard(s) named in {INDEX_NAME} are missing, e.g. {missing[0]}"
            )
        return shards
    if (path / WEIGHTS_NAME).is_file():
        _inside(path, WEIGHTS_NAME, str(path))
        return {WEIGHTS_NAME: []}
    raise CheckpointError(f"{path}: expected {WEIGHTS_NAME} or {INDEX_NAME}, found neither")


def _read_state(path: Path, dtype: torch.dtype | None, device: str | torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of the shards, by our names; stored dtypes must be float16 / bfloat16 / float32."""
    state: dict[str, torch.Tensor] = {}
    for shard in _shard_files(path):
        try:
            with safe_open(str(path / shard), framework="pt", device=str(device)) as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    ours = hf_to_ours(name)
                    if ours is None:
                        continue
                    t = f.get_tensor(name)
                    if t.dtype not in CASTABLE_FLOATS:
                        raise CheckpointError(
                            f"{path / shard}: {name}: expected dtype float32, float16 or bfloat16, got "
                            f"{str(t.dtype).removeprefix('torch.')}"
                        )
                    state[ours] = t.to(dtype) if dtype is not None else t
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path / shard}: not a readable safetensors file ({e})") from e
    return state


def from_hf(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    allow_large: bool = False,
) -> Llama:
    """Load a Hugging Face ``LlamaForCausalLM`` directory as :class:`Llama` (weights in ``dtype`` or as stored).

    ``config.json`` is checked field by field and against the size bound
    (:func:`notelab.core.limits.check_size`; ``allow_large=True`` lifts it) before any weight is
    read; shard paths must stay inside ``path``; weights must match the config in name, shape and
    dtype (float16 / bfloat16 / float32) and be finite.
    """
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"expected a Hugging Face checkpoint directory with config.json at {path}, found none")
    try:
        cfg = load_json(cfg_path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from e
    config = config_from_hf(cfg, str(cfg_path))
    try:
        check_size(config, allow_large=allow_large, dtype=dtype or torch.bfloat16)
    except ConfigError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from e
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
    for name, t in state.items():
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: expected finite weights, {ours_to_hf(name)} holds NaN/inf value(s)")
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
