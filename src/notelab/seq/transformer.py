"""The encoder-decoder Transformer (Vaswani et al. 2017, "Attention Is All You Need").

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V                                 (eq. 1)
    MultiHead(Q, K, V) = Concat(head_1..head_h) W^O,  head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)
    FFN(x)             = max(0, x W_1 + b_1) W_2 + b_2                                  (eq. 2)
    PE(p, 2i)          = sin(p / 10000^(2i/d_model)),  PE(p, 2i+1) = cos(p / 10000^(2i/d_model))   (sec. 3.5)
    input              = Embedding(x) * sqrt(d_model) + PE                              (sec. 3.4)

Each sub-layer f (self-attention, cross-attention, FFN) sits in a residual connection; the
normalisation goes after the sum in the paper (post-LN, sec. 3.1 and 5.4) or before the
sub-layer (pre-LN, Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture"),
which trains without warmup and needs one final LayerNorm after each stack::

    post-LN:  x = LN(x + Dropout(f(x)))            PostNorm
    pre-LN:   x = x + Dropout(f(LN(x)))            PreNorm   (+ LN after the last layer)

The variant is the ``residual`` constructor handed to the layers (``TransformerConfig.norm_first``
picks it, so a checkpoint's config.json fully determines the model)::

    encoder layer:  x -> [self-attn over x, key padding mask] -> [FFN]
    decoder layer:  y -> [causal self-attn over y] -> [cross-attn to encoder memory, key padding mask] -> [FFN]

Masks are boolean, True = may attend (``notelab.core.attention``); ``src_pad`` / ``tgt_pad`` are
``(B, T)`` with True at padding, the convention of ``torch.nn.Transformer``'s key padding masks.
Decoding with a cache keeps every decoder layer's self-attention keys/values in a static
``KVCache`` and computes the cross-attention keys/values of the memory once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from notelab.core.attention import KVCache, attention, padding_mask
from notelab.core.checkpoint import PretrainedMixin
from notelab.core.embeddings import sinusoidal_embedding
from notelab.core.errors import ConfigError, ShapeError, unknown_name
from notelab.core.mlp import FeedForward


@dataclass
class TransformerConfig:
    src_vocab: int = 8000
    tgt_vocab: int = 8000
    d_model: int = 512
    n_heads: int = 8
    n_layers_enc: int = 6
    n_layers_dec: int = 6
    d_ff: int = 2048
    dropout: float = 0.1  # P_drop: sub-layer outputs, embedding sums, attention weights, FFN hidden
    max_len: int = 512  # longest source or target sequence (positions 0 .. max_len-1)
    norm_first: bool = False  # False: post-LN (the paper); True: pre-LN
    tie_embeddings: bool = True  # decoder input embedding == output projection (sec. 3.4)
    share_src_tgt: bool = False  # one embedding for source and target (needs src_vocab == tgt_vocab)
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_name(cls, name: str, **overrides) -> TransformerConfig:
        """The paper's models (Table 3) ``base`` and ``big``, or ``tiny`` for tests; fields overridable.

        At a shared 37k vocabulary these have 63M and 214M parameters (the paper: 65M and 213M).
        """
        if name not in PRESETS:
            raise unknown_name("Transformer preset", name, PRESETS)
        return cls(**{**PRESETS[name], **overrides})

    def __post_init__(self) -> None:
        for name in ("src_vocab", "tgt_vocab", "d_model", "n_heads", "d_ff", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"TransformerConfig.{name}: expected an integer >= 1, got {value!r}")
        for name in ("n_layers_enc", "n_layers_dec"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"TransformerConfig.{name}: expected an integer >= 1, got {value!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"TransformerConfig: d_model {self.d_model} must be divisible by n_heads {self.n_heads}")
        if self.d_model % 2:
            raise ConfigError(f"TransformerConfig.d_model: expected an even number (sin/cos pairs), got {self.d_model}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"TransformerConfig.dropout: expected a number in [0, 1), got {self.dropout!r}")
        if self.share_src_tgt and self.src_vocab != self.tgt_vocab:
            raise ConfigError(
                f"TransformerConfig.share_src_tgt: needs src_vocab == tgt_vocab, got {self.src_vocab} and "
                f"{self.tgt_vocab}"
            )
        for name in ("pad_id", "bos_id", "eos_id"):
            value = getattr(self, name)
            if not 0 <= value < min(self.src_vocab, self.tgt_vocab):
                raise ConfigError(
                    f"TransformerConfig.{name}: expected an id in [0, {min(self.src_vocab, self.tgt_vocab)}), "
                    f"got {value!r}"
                )


PRESETS: dict[str, dict] = {
    "base": dict(d_model=512, n_heads=8, n_layers_enc=6, n_layers_dec=6, d_ff=2048, dropout=0.1),
    "big": dict(d_model=1024, n_heads=16, n_layers_enc=6, n_layers_dec=6, d_ff=4096, dropout=0.3),
    "tiny": dict(d_model=64, n_heads=4, n_layers_enc=2, n_layers_dec=2, d_ff=256, dropout=0.1),
}


def check_ids(name: str, ids: torch.Tensor, vocab: int, max_len: int, offset: int = 0) -> None:
    """Raise ``ShapeError`` unless ``ids`` is a non-empty ``(B, T)`` integer tensor in ``[0, vocab)``, T <= max_len.

    ``offset`` is the position of the first token (cached decoding). Skipped under ``torch.compile``,
    where reading the values back would break the graph.
    """
    if ids.dim() != 2 or ids.is_floating_point():
        raise ShapeError(f"{name}: expected integer token ids of shape (B, T), got {ids.dtype} {tuple(ids.shape)}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ShapeError(f"{name}: expected a non-empty batch of non-empty sequences, got shape {tuple(ids.shape)}")
    if offset + ids.shape[1] > max_len:
        raise ShapeError(
            f"{name}: sequence reaches position {offset + ids.shape[1]}, beyond the configured max_len {max_len}"
        )
    if torch.compiler.is_compiling():
        return
    lo, hi = torch.stack(torch.aminmax(ids)).tolist()  # one device sync, not two
    if lo < 0 or hi >= vocab:
        raise ShapeError(f"{name}: expected token ids in [0, {vocab}), got ids in [{lo}, {hi}]")


def check_pad(name: str, pad: torch.Tensor, ids: torch.Tensor) -> None:
    """``pad`` must be a bool ``(B, T)`` like ``ids`` and leave at least one real token per row."""
    if pad.dtype != torch.bool or pad.shape != ids.shape:
        raise ShapeError(
            f"{name}: expected a bool padding mask of shape {tuple(ids.shape)}, got {pad.dtype} {tuple(pad.shape)}"
        )
    if not torch.compiler.is_compiling() and bool(pad.all(1).any()):
        raise ShapeError(f"{name}: every sequence needs at least one non-pad token, got an all-padding row")


def interleaved_positions(max_len: int, d_model: int) -> torch.Tensor:
    """``(max_len, d_model)`` sinusoids in the paper's layout: sin at even features, cos at odd (sec. 3.5).

    ``sinusoidal_embedding`` returns ``[sin | cos]`` halves with the same frequencies; interleaving
    the halves is the permutation to the paper's order.
    """
    pe = sinusoidal_embedding(torch.arange(max_len), d_model)  # (T, D) = [sin_0..sin_{D/2-1} | cos_0..]
    return pe.view(max_len, 2, d_model // 2).transpose(1, 2).reshape(max_len, d_model)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections (sec. 3.2.2); self- or cross-attention.

    ``forward(x, kv)`` attends from ``x`` ``(B, Tq, D)`` to ``kv`` ``(B, Tk, D)`` (``x`` itself when
    ``kv`` is None). With ``cache`` the new keys/values are written at ``start`` and attention runs over
    the cached prefix; ``memory_kv`` passes keys/values projected earlier (cross-attention while decoding).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_heads  # every head has its own keys and values (no grouping)
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        # Prefix tuning's hook (notelab.peft.KVPrefix): (k, v, mask) -> the same with learned keys/values first.
        self.kv_prefix: nn.Module | None = None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)

    def project_kv(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(B, H, Tk, Dh)`` of ``kv`` ``(B, Tk, D)``."""
        return self._heads(self.k_proj(kv)), self._heads(self.v_proj(kv))

    def forward(
        self,
        x: torch.Tensor,
        kv: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        cache: KVCache | None = None,
        start: int = 0,
        memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        q = self._heads(self.q_proj(x))
        if memory_kv is not None:
            k, v = memory_kv
        else:
            k, v = self.project_kv(x if kv is None else kv)
            if cache is not None:
                k, v = cache.update(start, k, v)
        if self.kv_prefix is not None:
            k, v, mask = self.kv_prefix(k, v, mask)
        out = attention(q, k, v, mask=mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0)
        b, _, t, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1))


class PostNorm(nn.Module):
    """Residual with normalisation after the sum, ``LN(x + Dropout(f(x)))`` (the paper)."""

    final_norm = False  # the stack's output is already normalised

    def __init__(self, dim: int, dropout: float = 0.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return self.norm(x + self.drop(f(x)))


class PreNorm(nn.Module):
    """Residual with normalisation before the sub-layer, ``x + Dropout(f(LN(x)))`` (Xiong et al. 2020)."""

    final_norm = True  # the residual stream is never normalised inside the stack

    def __init__(self, dim: int, dropout: float = 0.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return x + self.drop(f(self.norm(x)))


Residual = type[PostNorm] | type[PreNorm]


class EncoderLayer(nn.Module):
    """Self-attention then FFN, each in a ``residual`` block (sec. 3.1, encoder)."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float = 0.0,
        residual: Residual = PostNorm,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout)
        self.ff = FeedForward(d_model, d_ff, nn.ReLU, dropout)
        self.attn_block = residual(d_model, dropout, eps)
        self.ff_block = residual(d_model, dropout, eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn_block(x, lambda h: self.self_attn(h, mask=mask))
        return self.ff_block(x, self.ff)


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention to the encoder memory, FFN (sec. 3.1, decoder)."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float = 0.0,
        residual: Residual = PostNorm,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, dropout)
        self.ff = FeedForward(d_model, d_ff, nn.ReLU, dropout)
        self.attn_block = residual(d_model, dropout, eps)
        self.cross_block = residual(d_model, dropout, eps)
        self.ff_block = residual(d_model, dropout, eps)

    def forward(
        self,
        y: torch.Tensor,
        memory: torch.Tensor | None,
        *,
        self_mask: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start: int = 0,
        memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        y = self.attn_block(y, lambda h: self.self_attn(h, mask=self_mask, is_causal=True, cache=cache, start=start))
        y = self.cross_block(y, lambda h: self.cross_attn(h, memory, mask=memory_mask, memory_kv=memory_kv))
        return self.ff_block(y, self.ff)


class TransformerCache:
    """Decoder state for incremental decoding: per layer a self-attention ``KVCache`` and the memory's k/v.

    ``length`` counts the target positions already decoded; ``reorder(index)`` selects batch rows
    (beam search keeps the surviving hypotheses).
    """

    def __init__(self, self_kv: list[KVCache], cross_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.self_kv = self_kv
        self.cross_kv = cross_kv
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.self_kv[0].max_len

    def reorder(self, index: torch.Tensor) -> None:
        for c in self.self_kv:
            c.k = c.k.index_select(0, index)
            c.v = c.v.index_select(0, index)
        self.cross_kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cross_kv]


class Transformer(PretrainedMixin, nn.Module):
    """Encoder-decoder Transformer: ``forward(src, tgt_in) -> logits (B, T, tgt_vocab)``.

    ``encode(src, src_pad) -> memory (B, S, D)``; ``decode(tgt, memory, src_pad, cache=...) -> logits``.
    ``src_pad`` defaults to ``src == pad_id``. Target padding needs no mask when it is on the right
    (the causal mask already hides later positions); ``tgt_pad`` is there for left-padded targets.
    """

    config_class = TransformerConfig
    model_type = "transformer"

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = c = config
        residual: Residual = PreNorm if c.norm_first else PostNorm
        self.src_embed = nn.Embedding(c.src_vocab, c.d_model)
        self.tgt_embed = self.src_embed if c.share_src_tgt else nn.Embedding(c.tgt_vocab, c.d_model)
        self.register_buffer("pe", interleaved_positions(c.max_len, c.d_model), persistent=False)
        self.drop = nn.Dropout(c.dropout)
        eps = c.layer_norm_eps
        layer_args = (c.d_model, c.n_heads, c.d_ff, c.dropout, residual, eps)
        self.encoder = nn.ModuleList(EncoderLayer(*layer_args) for _ in range(c.n_layers_enc))
        self.decoder = nn.ModuleList(DecoderLayer(*layer_args) for _ in range(c.n_layers_dec))
        self.enc_norm = nn.LayerNorm(c.d_model, eps=eps) if residual.final_norm else nn.Identity()
        self.dec_norm = nn.LayerNorm(c.d_model, eps=eps) if residual.final_norm else nn.Identity()
        self.lm_head = nn.Linear(c.d_model, c.tgt_vocab, bias=False)
        self.reset_parameters()
        if c.tie_embeddings:
            self.lm_head.weight = self.tgt_embed.weight

    def reset_parameters(self) -> None:
        # Xavier for projections (as torch.nn.Transformer); embeddings N(0, d^-1/2), so that after the
        # sqrt(d_model) scaling (sec. 3.4) token vectors have unit-scale entries, like the positions.
        for name, p in self.named_parameters():
            if p.dim() > 1 and "embed" not in name:
                nn.init.xavier_uniform_(p)
        for emb in {id(self.src_embed): self.src_embed, id(self.tgt_embed): self.tgt_embed}.values():
            nn.init.normal_(emb.weight, std=self.config.d_model**-0.5)

    def _embed(self, embed: nn.Embedding, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        x = embed(ids) * math.sqrt(self.config.d_model) + self.pe[start : start + ids.shape[1]]
        return self.drop(x)

    def source_padding(self, src: torch.Tensor, src_pad: torch.Tensor | None) -> torch.Tensor:
        return src == self.config.pad_id if src_pad is None else src_pad

    def encode(self, src: torch.Tensor, src_pad: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder memory ``(B, S, D)`` of ``src`` ``(B, S)``; padded positions are attended by nobody."""
        c = self.config
        check_ids("src", src, c.src_vocab, c.max_len)
        src_pad = self.source_padding(src, src_pad)
        check_pad("src_pad", src_pad, src)
        mask = padding_mask(src_pad)
        x = self._embed(self.src_embed, src)
        for layer in self.encoder:
            x = layer(x, mask)
        return self.enc_norm(x)

    def init_cache(
        self, memory: torch.Tensor, src_pad: torch.Tensor | None = None, max_len: int | None = None
    ) -> TransformerCache:
        """A fresh ``TransformerCache`` for decoding up to ``max_len`` target positions (BOS included)."""
        c = self.config
        max_len = c.max_len if max_len is None else max_len
        if max_len > c.max_len:
            raise ShapeError(f"init_cache: max_len {max_len} is beyond the configured max_len {c.max_len}")
        b = memory.shape[0]
        heads, hd = c.n_heads, c.d_model // c.n_heads
        self_kv = [KVCache(b, heads, max_len, hd, dtype=memory.dtype, device=memory.device) for _ in self.decoder]
        cross_kv = [layer.cross_attn.project_kv(memory) for layer in self.decoder]
        return TransformerCache(self_kv, cross_kv)

    def decode(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        src_pad: torch.Tensor | None = None,
        tgt_pad: torch.Tensor | None = None,
        cache: TransformerCache | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, T, tgt_vocab)`` of the next token after each of ``tgt`` ``(B, T)``.

        With ``cache``, ``tgt`` holds the tokens at positions ``cache.length ..`` (usually one) and the
        cache advances by ``T``; ``src_pad`` is the memory's padding (None: no padding, unlike ``encode``,
        since the source ids are not at hand here).
        """
        c = self.config
        start = 0 if cache is None else cache.length
        check_ids("tgt", tgt, c.tgt_vocab, c.max_len if cache is None else cache.max_len, offset=start)
        if memory.dim() != 3 or memory.shape[0] != tgt.shape[0] or memory.shape[2] != c.d_model:
            raise ShapeError(
                f"decode: expected memory of shape ({tgt.shape[0]}, S, {c.d_model}), got {tuple(memory.shape)}"
            )
        memory_mask = None if src_pad is None else padding_mask(src_pad)
        self_mask = None
        if tgt_pad is not None:
            if cache is not None:
                raise ShapeError("decode: tgt_pad is for full (uncached) decoding; with a cache pad on the right")
            check_pad("tgt_pad", tgt_pad, tgt)
            self_mask = padding_mask(tgt_pad)
        y = self._embed(self.tgt_embed, tgt, start)
        for i, layer in enumerate(self.decoder):
            y = layer(
                y,
                memory,
                self_mask=self_mask,
                memory_mask=memory_mask,
                cache=None if cache is None else cache.self_kv[i],
                start=start,
                memory_kv=None if cache is None else cache.cross_kv[i],
            )
        if cache is not None:
            cache.length += tgt.shape[1]
        return self.lm_head(self.dec_norm(y))

    def forward(
        self,
        src: torch.Tensor,
        tgt_in: torch.Tensor,
        src_pad: torch.Tensor | None = None,
        tgt_pad: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced logits ``(B, T, tgt_vocab)`` for decoder input ``tgt_in`` (BOS y_1 .. y_{T-1})."""
        src_pad = self.source_padding(src, src_pad)
        return self.decode(tgt_in, self.encode(src, src_pad), src_pad, tgt_pad)
