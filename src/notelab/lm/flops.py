"""Parameter and FLOP counts of a Llama, for model sizes and MFU.

Parameters of one decoder layer (no biases; d = dim, h = hidden_dim, Hq / Hkv heads of size D)::

    attention  d * Hq*D (q) + 2 * d * Hkv*D (k, v) + Hq*D * d (o)
    SwiGLU     3 * d * h            (GELU MLP: 2 * d * h)
    norms      2 * d                (LayerNorm: 4 * d, with biases)

plus the embedding V*d, the final norm and, unless tied, the output matrix V*d.

FLOPs per token (a multiply-add counts 2), after Kaplan et al. 2020 ("Scaling Laws for Neural
Language Models", Table 1) and Chowdhery et al. 2022 (PaLM, Appendix B):

    forward     2 N_mm + 4 L d T        (N_mm: parameters used in a matmul; 4 L d T: Q K^T and A V
                                         over T keys, counted as if unmasked, as PaLM does)
    training    6 N_mm + 12 L d T       (backward = 2x forward)

``N_mm`` excludes the embedding lookup (no arithmetic) and learned positions, but keeps a tied
output matrix, which is a matmul. MFU = achieved FLOP/s / peak FLOP/s.
"""

from __future__ import annotations

import torch
from torch import nn

from notelab.lm.config import LlamaConfig


def count_parameters(config: LlamaConfig) -> int:
    """Total parameters of ``Llama(config)`` by formula (module docstring); tied weights once."""
    c = config
    attn = c.dim * c.n_heads * c.head_dim + 2 * c.dim * c.n_kv_heads * c.head_dim + c.n_heads * c.head_dim * c.dim
    mlp = (3 if c.mlp == "swiglu" else 2) * c.dim * c.hidden_dim
    norm = c.dim if c.norm == "rmsnorm" else 2 * c.dim
    layer = attn + mlp + 2 * norm
    embed = c.vocab_size * c.dim * (1 if c.tie_embeddings else 2)
    pos = c.max_seq_len * c.dim if c.pos == "learned" else 0
    return c.n_layers * layer + norm + embed + pos


def count_module_parameters(module: nn.Module) -> int:
    """Parameters of a built module (shared tensors once); works on ``torch.device("meta")``."""
    return sum(p.numel() for p in module.parameters())


def matmul_parameters(config: LlamaConfig) -> int:
    """``N_mm``: the parameters that take part in a matmul for every token."""
    lookup = 0 if config.tie_embeddings else config.vocab_size * config.dim
    pos = config.max_seq_len * config.dim if config.pos == "learned" else 0
    return count_parameters(config) - lookup - pos


def flops_per_token(config: LlamaConfig, seq_len: int, training: bool = True) -> float:
    """FLOPs per token at context ``seq_len``: ``6 N + 12 L d T`` training, ``2 N + 4 L d T`` forward."""
    n = matmul_parameters(config)
    attn = 2 * 2 * config.n_layers * config.n_heads * config.head_dim * seq_len
    return float(3 * (2 * n + attn) if training else 2 * n + attn)


def mfu(config: LlamaConfig, seq_len: int, tokens_per_second: float, peak_flops: float, training: bool = True) -> float:
    """Model FLOPs utilisation: ``flops_per_token * tokens/s / peak`` (a fraction, 0..1)."""
    return flops_per_token(config, seq_len, training) * tokens_per_second / peak_flops


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the parameters (shared tensors once): what one decode step reads from memory."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_cache_bytes(config: LlamaConfig, batch: int, seq_len: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of a key/value cache for ``batch`` sequences of ``seq_len`` tokens."""
    per_token = 2 * config.n_layers * config.n_kv_heads * config.head_dim
    return batch * seq_len * per_token * torch.empty((), dtype=dtype).element_size()
