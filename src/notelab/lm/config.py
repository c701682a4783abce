"""``LlamaConfig``: the LLaMA / Llama 3 decoder's hyper-parameters and the published presets.

Feed-forward width (the reference ``llama/model.py`` rule, Touvron et al. 2023)::

    hidden = int(2 * (4 * dim) / 3)                 # SwiGLU has 3 matrices: 2/3 of 4*dim keeps 8 dim^2
    hidden = int(ffn_dim_multiplier * hidden)       # Llama 3 widens it (1.3 for 8B/70B, 1.2 for 405B)
    hidden = multiple_of * ceil(hidden / multiple_of)

Presets (parameter counts as published, checked in ``tests/lm/test_presets.py``):

    name           dim    L   heads kv   hidden  vocab    params
    llama-7b      4096   32    32   32   11008   32000     6,738,415,616
    llama-13b     5120   40    40   40   13824   32000    13,015,864,320
    llama-33b     6656   60    52   52   17920   32000    32,528,943,616
    llama-65b     8192   80    64   64   22016   32000    65,285,660,672
    llama3-8b     4096   32    32    8   14336  128256     8,030,261,248
    llama3-70b    8192   80    64    8   28672  128256    70,553,706,496
    llama3.1-405b 16384 126   128    8   53248  128256   405,853,388,800
    llama3.2-1b   2048   16    32    8    8192  128256     1,235,814,400  (tied embeddings)
    llama3.2-3b   3072   28    24    8    8192  128256     3,212,749,824  (tied embeddings)

``llama3.1-*`` equal ``llama3-*`` plus the RoPE frequency scaling (factor 8, low 1, high 4,
original context 8192) and a 131,072-token context; Llama 3.2 uses factor 32.

``norm`` / ``mlp`` / ``pos`` pick the block's constructors (``notelab.lm.model.block_parts``), so a
GPT-2-style block (LayerNorm, GELU MLP of width 4*dim, learned positions) is the same model class:
see :func:`gpt2_variant`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from notelab.core.errors import ConfigError, unknown_name
from notelab.core.limits import check_size
from notelab.core.rope import RopeScaling

NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "gelu")
POSITIONS = ("rope", "learned")


def llama_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """The SwiGLU width by Llama's rule (module docstring)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _check_int(name: str, value: Any, expected: str = "an integer >= 1") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name}: expected {expected}, got {value!r}")


def _check_positive(name: str, value: Any, expected: str = "a finite number > 0") -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise ConfigError(f"{name}: expected {expected}, got {value!r}")


def _check_rope_scaling(s: Any) -> None:
    """Llama 3.1's scaling divides by ``high_freq_factor - low_freq_factor``: they must differ."""
    if not isinstance(s, RopeScaling):
        raise ConfigError(f"LlamaConfig.rope_scaling: expected None or a RopeScaling, got {type(s).__name__}")
    for name in ("factor", "low_freq_factor", "high_freq_factor"):
        _check_positive(f"LlamaConfig.rope_scaling.{name}", getattr(s, name))
    _check_int("LlamaConfig.rope_scaling.original_max_position_embeddings", s.original_max_position_embeddings)
    if not s.high_freq_factor > s.low_freq_factor:
        raise ConfigError(
            f"LlamaConfig.rope_scaling: expected high_freq_factor > low_freq_factor, "
            f"got {s.high_freq_factor} and {s.low_freq_factor}"
        )


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    dim: int = 4096  # model width d
    n_layers: int = 32
    n_heads: int = 32  # query heads
    n_kv_heads: int | None = None  # key/value heads (GQA); None: = n_heads (multi-head attention)
    multiple_of: int = 256  # the FFN width is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None  # Llama 3's widening of the FFN
    ffn_hidden_dim: int | None = None  # explicit FFN width (a Hugging Face intermediate_size); None: Llama's rule
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None  # Llama 3.1 frequency scaling
    max_seq_len: int = 2048  # the context: longest sequence (and default KV cache length)
    tie_embeddings: bool = False  # lm_head shares the token embedding matrix (Llama 3.2 1B/3B)
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    mlp: str = "swiglu"  # "swiglu" | "gelu"
    pos: str = "rope"  # "rope" | "learned" (absolute position embeddings, GPT-2)

    def __post_init__(self) -> None:
        """Check every field (one-line :class:`ConfigError` naming it); sizes are bounded at build time
        (:func:`notelab.core.limits.check_size`), so a config of a 405B model can exist without its memory."""
        if isinstance(self.rope_scaling, dict):
            try:
                self.rope_scaling = RopeScaling(**self.rope_scaling)
            except TypeError as e:
                raise ConfigError(f"LlamaConfig.rope_scaling: {e}") from e
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_seq_len"):
            _check_int(f"LlamaConfig.{name}", getattr(self, name))
        if self.ffn_hidden_dim is not None:
            _check_int("LlamaConfig.ffn_hidden_dim", self.ffn_hidden_dim, "None or an integer >= 1")
        if self.ffn_dim_multiplier is not None:
            _check_positive("LlamaConfig.ffn_dim_multiplier", self.ffn_dim_multiplier, "None or a finite number > 0")
        _check_positive("LlamaConfig.norm_eps", self.norm_eps)
        _check_positive("LlamaConfig.rope_theta", self.rope_theta)
        if not isinstance(self.tie_embeddings, bool):
            raise ConfigError(f"LlamaConfig.tie_embeddings: expected true or false, got {self.tie_embeddings!r}")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)
        if self.dim % self.n_heads:
            raise ConfigError(f"LlamaConfig: dim {self.dim} must be a multiple of n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"LlamaConfig: n_heads {self.n_heads} must be a multiple of n_kv_heads {self.n_kv_heads}")
        for name, value, known in (("norm", self.norm, NORMS), ("mlp", self.mlp, MLPS), ("pos", self.pos, POSITIONS)):
            if not isinstance(value, str) or value not in known:
                raise unknown_name(f"LlamaConfig.{name}", value, known)
        # Derived values (plain attributes, so they are not written to config.json).
        self.head_dim = self.dim // self.n_heads
        if self.pos == "rope" and self.head_dim % 2:
            raise ConfigError(f"LlamaConfig: RoPE needs an even head_dim, got {self.head_dim}")
        if self.ffn_hidden_dim is not None:
            self.hidden_dim = self.ffn_hidden_dim
        elif self.mlp == "gelu":
            self.hidden_dim = 4 * self.dim
        else:
            self.hidden_dim = llama_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    def num_parameters(self) -> int:
        """Parameters of ``Llama(self)`` by formula (``notelab.lm.flops``), for the size bound before allocation."""
        from notelab.lm.flops import count_parameters  # flops imports this module

        return count_parameters(self)

    def check_size(self, allow_large: bool | None = None) -> int:
        """Raise :class:`ConfigError` unless ``Llama(self)`` fits :func:`notelab.core.limits.check_size`."""
        return check_size(self, allow_large=allow_large)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> LlamaConfig:
        """A named preset (``PRESETS``), with fields replaced by ``overrides``."""
        if name not in PRESETS:
            raise unknown_name("Llama preset", name, PRESETS)
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(overrides) - fields)
        if bad:
            raise ConfigError(f"LlamaConfig.from_name: unknown field(s) {', '.join(bad)}; known: {', '.join(fields)}")
        return cls(**{**PRESETS[name], **overrides})


def gpt2_variant(config: LlamaConfig, **overrides: Any) -> LlamaConfig:
    """The same shape with GPT-2's block: LayerNorm, a GELU MLP (width 4*dim) and learned positions."""
    base = {"norm": "layernorm", "mlp": "gelu", "pos": "learned", "ffn_hidden_dim": None}
    return dataclasses.replace(config, **{**base, **overrides})


_LLAMA1 = dict(vocab_size=32000, multiple_of=256, norm_eps=1e-6, rope_theta=10000.0, max_seq_len=2048)
_LLAMA3 = dict(vocab_size=128256, n_kv_heads=8, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192)
_SCALE31 = dict(rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), max_seq_len=131072)
_SCALE32 = dict(rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), max_seq_len=131072, tie_embeddings=True)
_L3_8B = dict(_LLAMA3, dim=4096, n_layers=32, n_heads=32, multiple_of=1024, ffn_dim_multiplier=1.3)
_L3_70B = dict(_LLAMA3, dim=8192, n_layers=80, n_heads=64, multiple_of=4096, ffn_dim_multiplier=1.3)

PRESETS: dict[str, dict[str, Any]] = {
    "llama-7b": dict(_LLAMA1, dim=4096, n_layers=32, n_heads=32),
    "llama-13b": dict(_LLAMA1, dim=5120, n_layers=40, n_heads=40),
    "llama-33b": dict(_LLAMA1, dim=6656, n_layers=60, n_heads=52),
    "llama-65b": dict(_LLAMA1, dim=8192, n_layers=80, n_heads=64),
    "llama3-8b": _L3_8B,
    "llama3-70b": _L3_70B,
    "llama3.1-8b": dict(_L3_8B, **_SCALE31),
    "llama3.1-70b": dict(_L3_70B, **_SCALE31),
    "llama3.1-405b": dict(
        _LLAMA3, dim=16384, n_layers=126, n_heads=128, multiple_of=4096, ffn_dim_multiplier=1.2, **_SCALE31
    ),
    "llama3.2-1b": dict(
        _LLAMA3, dim=2048, n_layers=16, n_heads=32, multiple_of=256, ffn_dim_multiplier=1.5, **_SCALE32
    ),
    "llama3.2-3b": dict(
        _LLAMA3, dim=3072, n_layers=28, n_heads=24, multiple_of=256, ffn_dim_multiplier=1.0, **_SCALE32
    ),
    # CPU-sized models for tests, demos and the reproduction (vocab of notelab's default BPE tokenizer).
    "llama-tiny": dict(vocab_size=4096, dim=128, n_layers=4, n_heads=4, multiple_of=32, max_seq_len=256),
    "llama3-tiny": dict(
        vocab_size=4096,
        dim=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        multiple_of=32,
        rope_theta=500000.0,
        max_seq_len=512,
    ),
    "llama-small": dict(
        vocab_size=4096, dim=384, n_layers=6, n_heads=6, n_kv_heads=2, multiple_of=64, max_seq_len=1024
    ),
}
