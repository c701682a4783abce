"""Memory of a fine-tuning run of a Llama-shaped decoder: weights, gradients, optimizer states, activations.

Model states (Rajbhandari et al. 2020, "ZeRO", sec. 3.1): mixed-precision Adam keeps, per trained
parameter, its 16-bit weight and gradient (2 + 2 bytes) and fp32 master weight, momentum and variance
(4 + 4 + 4): 16 bytes. A frozen parameter keeps its weight only. Here, with ``w`` the bytes of ``dtype``::

    weights    = N_total * w
    master     = N_train * 4            (only when w < 4: the fp32 copy the optimizer updates)
    gradients  = N_train * w
    optimizer  = N_train * s            s = 8 (AdamW: two fp32 moments), 4 (SGD with momentum), 0 (SGD)

Activations kept for backward, per token and layer, in elements (flash attention: no T x T scores)::

    attention  2 d (block input, its norm) + 2 q_dim (queries, attention output) + 2 kv_dim (keys, values)
    mlp        2 d (residual, its norm) + 4 h (gate, up, SiLU(gate), product)
    logits     V (w bytes) + V (fp32 for the softmax, when w < 4), per token, once

With activation checkpointing only each block's input (d per token and layer) is kept, plus one block's
activations while it is recomputed. LoRA adds ``r`` per token and adapted Linear (``A x``); prompt tuning
makes every sequence ``n`` tokens longer. An estimate of the dominant terms: framework overhead, CUDA
context and fragmentation are not counted. Checked against the bytes autograd saves for a small notelab
Llama on the CPU (``tests/peft/test_estimate.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from notelab.core.errors import ConfigError, unknown_name

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OPTIMIZER_BYTES = {"adamw": 8, "sgd-momentum": 4, "sgd": 0}
ESTIMATE_METHODS = ("full", "lora", "prefix", "adapter", "prompt", "ia3")


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide a Llama-style decoder's memory (names as in Hugging Face configs in comments)."""

    vocab_size: int  # vocab_size
    dim: int  # hidden_size
    n_layers: int  # num_hidden_layers
    n_heads: int  # num_attention_heads
    n_kv_heads: int  # num_key_value_heads
    hidden_dim: int  # intermediate_size
    tie_embeddings: bool = False  # tie_word_embeddings
    qkv_bias: bool = False  # Qwen1.5 / Qwen2: biases on q, k, v

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """Per layer: name -> (in_features, out_features)."""
        d, q, kv, h = self.dim, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.hidden_dim
        return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
                "gate_proj": (d, h), "up_proj": (d, h), "down_proj": (h, d)}  # fmt: skip

    def n_params(self) -> int:
        per_layer = sum(i * o for i, o in self.linears().values()) + 2 * self.dim
        if self.qkv_bias:
            per_layer += (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        embeddings = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return embeddings + self.n_layers * per_layer + self.dim


# Published shapes (config.json of each checkpoint).
PRESETS: dict[str, ModelShape] = {
    "qwen1.5-7b": ModelShape(151936, 4096, 32, 32, 32, 11008, qkv_bias=True),
    "qwen1.5-72b": ModelShape(152064, 8192, 80, 64, 64, 24576, qkv_bias=True),
    "llama-7b": ModelShape(32000, 4096, 32, 32, 32, 11008),
    "llama3-8b": ModelShape(128256, 4096, 32, 32, 8, 14336),
    "llama3-70b": ModelShape(128256, 8192, 80, 64, 8, 28672),
    "llama3.2-1b": ModelShape(128256, 2048, 16, 32, 8, 8192, tie_embeddings=True),
}


def shape_from_hf(cfg: dict[str, Any], where: str = "config.json") -> ModelShape:
    """A :class:`ModelShape` from a Hugging Face ``config.json`` (Llama / Qwen2 / Mistral layout)."""
    keys = {"vocab_size": "vocab_size", "dim": "hidden_size", "n_layers": "num_hidden_layers",
            "n_heads": "num_attention_heads", "hidden_dim": "intermediate_size"}  # fmt: skip
    values: dict[str, Any] = {}
    for ours, theirs in keys.items():
        v = cfg.get(theirs)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{where}: {theirs}: expected an integer >= 1, got {v!r}")
        values[ours] = v
    values["n_kv_heads"] = cfg.get("num_key_value_heads") or values["n_heads"]
    values["tie_embeddings"] = bool(cfg.get("tie_word_embeddings", False))
    values["qkv_bias"] = bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2"))
    return ModelShape(**values)


@dataclass(frozen=True)
class MethodSpec:
    """What is trained: the method and its size knobs (LoRA rank on every linear, virtual tokens, bottleneck)."""

    method: str = "full"
    r: int = 8
    num_virtual_tokens: int = 20
    encoder_hidden_size: int = 512
    bottleneck: int = 64
    lora_targets: tuple[str, ...] = ()  # LoRA on these per-layer linears (q_proj, ..., down_proj); () = all

    def __post_init__(self) -> None:
        if self.method not in ESTIMATE_METHODS:
            raise unknown_name("PEFT method", self.method, ESTIMATE_METHODS)
        known = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        for t in self.lora_targets:
            if t not in known:
                raise unknown_name("LoRA target", t, known)
        for f in ("r", "num_virtual_tokens", "encoder_hidden_size", "bottleneck"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"MethodSpec.{f}: expected an integer >= 1, got {v!r}")


def lora_linears(shape: ModelShape, spec: MethodSpec) -> dict[str, tuple[int, int]]:
    return {n: io for n, io in shape.linears().items() if not spec.lora_targets or n in spec.lora_targets}


def trainable_params(shape: ModelShape, spec: MethodSpec) -> int:
    """Parameters the method trains (LoRA on every linear of every layer; Houlsby adapters, two per layer)."""
    L, d, kv = shape.n_layers, shape.dim, shape.n_kv_heads * shape.head_dim
    n = spec.num_virtual_tokens
    if spec.method == "full":
        return shape.n_params()
    if spec.method == "lora":
        return L * sum(spec.r * (i + o) for i, o in lora_linears(shape, spec).values())
    if spec.method == "prefix":  # P' and the reparameterising MLP, trained together
        out, hid = L * 2 * kv, spec.encoder_hidden_size
        return n * d + d * hid + hid + hid * out + out
    if spec.method == "adapter":
        return L * 2 * (2 * d * spec.bottleneck + spec.bottleneck + d)
    if spec.method == "prompt":
        return n * d
    return L * (2 * kv + shape.hidden_dim)  # ia3: keys, values, the feed-forward's input


def activation_bytes(shape: ModelShape, spec: MethodSpec, batch: int, seq: int, act_bytes: int, recompute: bool) -> int:
    """Activations kept for backward (module docstring)."""
    tokens = batch * (seq + (spec.num_virtual_tokens if spec.method == "prompt" else 0))
    d, q, kv, h = shape.dim, shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim, shape.hidden_dim
    per_layer = 2 * d + 2 * q + 2 * kv + 2 * d + 4 * h
    if spec.method == "lora":
        per_layer += spec.r * len(lora_linears(shape, spec))
    layer = tokens * per_layer * act_bytes
    logits = tokens * shape.vocab_size * (act_bytes + (4 if act_bytes < 4 else 0))  # + the fp32 copy
    if recompute:
        return shape.n_layers * tokens * d * act_bytes + layer + logits
    return shape.n_layers * layer + logits


@dataclass(frozen=True)
class Estimate:
    total_params: int
    trainable_params: int
    weights: int  # bytes
    master: int
    gradients: int
    optimizer: int
    activations: int
    activations_checkpointed: int

    @property
    def states(self) -> int:
        return self.weights + self.master + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.states + self.activations

    @property
    def total_checkpointed(self) -> int:
        return self.states + self.activations_checkpointed


def estimate(
    shape: ModelShape,
    spec: MethodSpec,
    *,
    dtype: str = "bf16",
    optimizer: str = "adamw",
    batch: int = 1,
    seq: int = 2048,
) -> Estimate:
    """Bytes of a fine-tuning run (module docstring)."""
    if dtype not in DTYPE_BYTES:
        raise unknown_name("dtype", dtype, DTYPE_BYTES)
    if optimizer not in OPTIMIZER_BYTES:
        raise unknown_name("optimizer", optimizer, OPTIMIZER_BYTES)
    for name, v in (("batch", batch), ("seq", seq)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"estimate: {name}: expected an integer >= 1, got {v!r}")
    w = DTYPE_BYTES[dtype]
    n_total = shape.n_params() + (0 if spec.method == "full" else trainable_params(shape, spec))
    n_train = trainable_params(shape, spec)
    return Estimate(
        total_params=n_total,
        trainable_params=n_train,
        weights=n_total * w,
        master=n_train * 4 if w < 4 else 0,
        gradients=n_train * w,
        optimizer=n_train * OPTIMIZER_BYTES[optimizer],
        activations=activation_bytes(shape, spec, batch, seq, w, recompute=False),
        activations_checkpointed=activation_bytes(shape, spec, batch, seq, w, recompute=True),
    )


def format_table(rows: dict[str, Estimate]) -> str:
    """A plain-text table, one row per labelled estimate, sizes in GB (1e9 bytes)."""
    cols = ["trainable", "weights", "master", "grads", "optim", "activ", "activ(ckpt)", "total", "total(ckpt)"]
    lines = [f"{'run':<28}" + "".join(f"{c:>13}" for c in cols)]
    for label, e in rows.items():
        frac = f"{100 * e.trainable_params / e.total_params:.3g}%"
        vals = [e.weights, e.master, e.gradients, e.optimizer, e.activations, e.activations_checkpointed, e.total,
                e.total_checkpointed]  # fmt: skip
        lines.append(f"{label:<28}{frac:>13}" + "".join(f"{v / 1e9:>12.1f}G" for v in vals))
    return "\n".join(lines)


def shape_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(ModelShape)]
