"""OadTR: online action detection with Transformers (Wang et al. 2021, ICCV, sec. 3) and a causal-Transformer baseline.

::

    features f_{t-T+1} .. f_t  (B, T, d_in)
        | Linear -> (B, T, d)          append the task token   -> (B, T+1, d)   + learned positions
        v
    encoder  x n_layers:  h = h + Drop(MHSA(LN(h)));  h = h + FFN_GELU(LN(h))        (pre-norm, ViT)
        | LN
        +------------------------------+
        |                              v
        |        queries q_1..q_Q  (learned)  x n_dec_layers:
        |            q = LN(q + Drop(causal MHSA(q)))                                  (post-norm)
        |            q = LN(q + Drop(MHA(q, encoder output)))
        |            q = LN(q + FFN_GELU(q))
        |                              | LN -> d_1..d_Q  --> Linear -> future logits  (B, Q, C)
        v                              v
    task token output  h_token   ++   mean_i d_i   --> Linear -> current logits  (B, C)

The task token's output gathers the history relevant to the current frame (eq. 4); the decoder's
queries predict the next ``Q`` frames' actions (eq. 6-7), and their mean joins the token in the
classifier (eq. 8). Training loss (eq. 9): ``CE(current) + 0.5 * mean_i CE(future_i)``, the
ambiguous class ignored (:mod:`notelab.oad.loss`).

Differences from the official module: its decoder also defines a learned positional encoding of
the queries (``decoder_position_encoding``, 8 x 1024) that ``forward`` never applies; it is left
out here, so the official preset has 74,709,036 - 8,192 parameters. Tokens and positions start
from N(0, 0.02) rather than zeros (all-zero queries are identical and get identical updates at
the first step).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from notelab.core.attention import attention
from notelab.core.checkpoint import PretrainedMixin
from notelab.core.errors import ShapeError
from notelab.core.mlp import FeedForward
from notelab.oad.config import CausalTransformerConfig, OadTRConfig
from notelab.seq.transformer import MultiHeadAttention, PostNorm, PreNorm


class OADOutput(NamedTuple):
    logits: torch.Tensor  # (B, C) the current frame
    future: torch.Tensor | None  # (B, Q, C) the next Q frames, or None for a model that does not anticipate


def check_window(name: str, x: torch.Tensor, window: int, d_in: int) -> None:
    """``x`` must be ``(B, window, d_in)``; a wrong feature size or window is a one-line :class:`ShapeError`."""
    if x.ndim != 3 or x.shape[1] != window or x.shape[2] != d_in:
        raise ShapeError(f"{name}: expected features (batch, {window} frames, {d_in} features), got {tuple(x.shape)}")


class SelfAttention(nn.Module):
    """Multi-head self-attention: one fused bias-free q/k/v projection (ViT's ``qkv``), an output projection."""

    def __init__(self, dim: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, Dh)
        out = attention(q, k, v, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class EncoderBlock(nn.Module):
    """Pre-norm encoder layer: ``h + Drop(MHSA(LN h))``, then ``h + FFN(LN h)`` with GELU."""

    def __init__(self, dim: int, n_heads: int, d_ff: int, dropout: float, attn_dropout: float) -> None:
        super().__init__()
        self.attn = SelfAttention(dim, n_heads, attn_dropout)
        self.ff = FeedForward(dim, d_ff, nn.GELU, dropout)
        self.attn_block = PreNorm(dim, dropout)
        self.ff_block = PreNorm(dim, dropout)

    def forward(self, h: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        h = self.attn_block(h, lambda x: self.attn(x, is_causal))
        return self.ff_block(h, self.ff)


class FutureDecoderLayer(nn.Module):
    """Post-norm decoder layer over the future queries: causal self-attention, cross-attention, FFN (GELU)."""

    def __init__(self, dim: int, n_heads: int, d_ff: int, dropout: float, attn_dropout: float) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(dim, n_heads, attn_dropout)
        self.cross_attn = MultiHeadAttention(dim, n_heads, attn_dropout)
        self.ff = FeedForward(dim, d_ff, nn.GELU, dropout)
        self.self_block = PostNorm(dim, dropout)
        self.cross_block = PostNorm(dim, dropout)
        self.ff_block = PostNorm(dim, dropout)

    def forward(self, q: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        q = self.self_block(q, lambda x: self.self_attn(x, is_causal=True))
        q = self.cross_block(q, lambda x: self.cross_attn(x, memory))
        return self.ff_block(q, self.ff)


class OadTR(PretrainedMixin, nn.Module):
    """OadTR; ``forward(features (B, T, d_in)) -> OADOutput(logits (B, C), future (B, Q, C) | None)``.

    Ablations are configs: ``task_token=False`` (classify from the current frame's output),
    ``n_dec_layers=0, n_future=0`` (no decoder), both (encoder only).
    """

    config_class = OadTRConfig
    model_type = "oadtr"
    causal = False  # the encoder's attention is bidirectional over the (past-only) window

    def __init__(self, config: OadTRConfig) -> None:
        super().__init__()
        self.config = c = config
        n_pos = c.window + int(c.task_token)
        self.embed = nn.Linear(c.d_in, c.d_model)
        self.task_token = nn.Parameter(torch.zeros(1, 1, c.d_model)) if c.task_token else None
        self.pos_embedding = nn.Parameter(torch.zeros(1, n_pos, c.d_model))
        self.drop = nn.Dropout(c.dropout)
        self.encoder = nn.ModuleList(
            EncoderBlock(c.d_model, c.n_heads, c.d_ff, c.dropout, c.attn_dropout) for _ in range(c.n_layers)
        )
        self.encoder_norm = nn.LayerNorm(c.d_model)
        if c.n_dec_layers:
            self.queries = nn.Parameter(torch.zeros(1, c.n_future, c.d_model))
            self.decoder = nn.ModuleList(
                FutureDecoderLayer(c.d_model, c.n_dec_heads, c.d_ff_dec, c.dropout, c.attn_dropout)
                for _ in range(c.n_dec_layers)
            )
            self.decoder_norm = nn.LayerNorm(c.d_model)
            self.future_head = nn.Linear(c.d_model, c.n_classes)
        self.head = nn.Linear(c.d_model * (2 if c.n_dec_layers else 1), c.n_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in (self.task_token, self.pos_embedding, getattr(self, "queries", None)):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder output ``(B, T (+1 with the task token, last), d)``."""
        check_window(type(self).__name__, features, self.config.window, self.config.d_in)
        h = self.embed(features)
        if self.task_token is not None:
            h = torch.cat([h, self.task_token.expand(h.shape[0], -1, -1)], dim=1)
        h = self.drop(h + self.pos_embedding)
        for block in self.encoder:
            h = block(h, self.causal)
        return self.encoder_norm(h)

    def forward(self, features: torch.Tensor) -> OADOutput:
        memory = self.encode(features)
        summary = memory[:, -1]  # the task token's output (or the current frame's, without a token)
        future = None
        if self.config.n_dec_layers:
            q = self.queries.expand(memory.shape[0], -1, -1)
            for layer in self.decoder:
                q = layer(q, memory)
            q = self.drop(self.decoder_norm(q))
            future = self.future_head(q)
            summary = torch.cat([summary, q.mean(dim=1)], dim=-1)
        return OADOutput(self.head(summary), future)


class CausalTransformer(OadTR):
    """Baseline: OadTR's encoder under a causal mask, classifying the current (last) frame; no token, no decoder."""

    config_class = CausalTransformerConfig
    model_type = "causal_transformer"
    causal = True
