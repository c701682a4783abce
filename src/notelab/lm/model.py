"""The LLaMA / Llama 3 decoder (Touvron et al. 2023, "LLaMA"; Grattafiori et al. 2024, "The Llama 3 Herd").

A pre-normalised decoder-only Transformer (Vaswani et al. 2017) with three changes from GPT:

    h   = x + Attn(RMSNorm(x))                 pre-norm residual (GPT-3); RMSNorm (Zhang & Sennrich 2019)
    out = h + SwiGLU(RMSNorm(h))               SwiGLU(x) = W_down (SiLU(W_gate x) * W_up x) (Shazeer 2020)
    q, k <- RoPE(q, p), RoPE(k, p)             rotary positions (Su et al. 2021, eq. 34), theta = rope_theta,
                                               with the Llama 3.1 frequency scaling (notelab.core.rope)

    logits = W_out RMSNorm(h_L)                W_out tied to the embedding when tie_embeddings

Grouped-query attention (Ainslie et al. 2023): ``n_heads`` query heads share ``n_kv_heads`` key and
value heads, which shrinks the KV cache by ``n_heads / n_kv_heads``::

    x ─┬─ q_proj ─ (B, Hq, T, D) ──RoPE──┐
       ├─ k_proj ─ (B, Hkv, T, D) ─RoPE──┼─ cache ─ SDPA ─ o_proj
       └─ v_proj ─ (B, Hkv, T, D) ───────┘

Parameter names follow Hugging Face's ``LlamaForCausalLM`` without its ``model.`` prefix
(``embed_tokens``, ``layers.{i}.self_attn.q_proj``, ``layers.{i}.mlp.gate_proj``,
``input_layernorm``, ``post_attention_layernorm``, ``norm``, ``lm_head``), so conversion
(``notelab.lm.convert``) is a prefix.

The block takes its norm and MLP as constructors; ``LlamaConfig(norm="layernorm", mlp="gelu",
pos="learned")`` gives a GPT-2 block (Radford et al. 2019) in the same class, for comparisons.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from notelab.core.attention import KVCache, attention
from notelab.core.checkpoint import PretrainedMixin
from notelab.core.errors import ShapeError
from notelab.core.mlp import FeedForward, SwiGLU
from notelab.core.norms import RMSNorm
from notelab.core.rope import apply_rope, rope_cos_sin, rope_inv_freq
from notelab.lm.config import LlamaConfig

NormFactory = Callable[[int, float], nn.Module]  # (dim, eps) -> module
MLPFactory = Callable[[int, int], nn.Module]  # (dim, hidden) -> module
FusedWeights = list[tuple[torch.Tensor, torch.Tensor | None]]  # per layer: [q; k; v], [gate; up] or None


def decode_inputs(model: Llama, tok: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
    """For the decode steps over stacked weights: the embeddings ``(B, 1, dim)`` of one token a row (``tok``
    ``(B, 1)`` at slots ``pos`` ``(B,)``) and the RoPE tables (cos, sin) ``(B, 1, 1, D)`` of the slots (None for
    learned positions, added here)."""
    slots = pos[:, None]
    x = model.embed_tokens(tok)
    if model.embed_positions is not None:
        return x + model.embed_positions(slots), None
    cos, sin = rope_cos_sin(slots, model.inv_freq)
    return x, (cos[:, None], sin[:, None])


def split_qkv(qkv: torch.Tensor, attn: Attention) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[q; k; v]`` of one token a row ``(B, [1,] (Hq + 2 Hkv) D)`` as heads ``(B, H, 1, D)``."""
    B, D = qkv.shape[0], attn.head_dim
    q, k, v = qkv.split([attn.n_heads * D, attn.n_kv_heads * D, attn.n_kv_heads * D], dim=-1)
    return tuple(t.view(B, 1, -1, D).transpose(1, 2) for t in (q, k, v))


def block_parts(config: LlamaConfig) -> tuple[NormFactory, MLPFactory]:
    """The norm and MLP constructors named by ``config.norm`` / ``config.mlp`` (the one place they are chosen)."""
    norms: dict[str, NormFactory] = {"rmsnorm": RMSNorm, "layernorm": lambda dim, eps: nn.LayerNorm(dim, eps=eps)}
    mlps: dict[str, MLPFactory] = {
        "swiglu": SwiGLU,
        "gelu": partial(FeedForward, activation=partial(nn.GELU, approximate="tanh"), bias=False),
    }
    return norms[config.norm], mlps[config.mlp]


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        # Prefix tuning's hook (notelab.peft.KVPrefix): (k, v, mask) -> the same with learned keys/values first.
        self.kv_prefix: nn.Module | None = None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: KVCache | None,
        start: int | torch.Tensor,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, Hq, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            # An int start grows the visible prefix; a tensor (cache slots) keeps every shape static.
            k, v = cache.update(start, k, v) if isinstance(start, int) else cache.write(start, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
        if self.kv_prefix is not None:
            k, v, mask = self.kv_prefix(k, v, mask)
        y = attention(q, k, v, mask=mask, is_causal=is_causal)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class Block(nn.Module):
    """Pre-norm residual block; ``norm`` and ``mlp`` are injected constructors."""

    def __init__(self, config: LlamaConfig, norm: NormFactory = RMSNorm, mlp: MLPFactory = SwiGLU) -> None:
        super().__init__()
        self.input_layernorm = norm(config.dim, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = norm(config.dim, config.norm_eps)
        self.mlp = mlp(config.dim, config.hidden_dim)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: KVCache | None,
        start: int | torch.Tensor,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, is_causal, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(PretrainedMixin, nn.Module):
    """Decoder-only language model: ``tokens (B, T) -> logits (B, T, vocab_size)``."""

    config_class = LlamaConfig
    model_type = "llama"

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        config.check_size()  # the size bound (notelab.core.limits), before anything is allocated
        self.config = config
        norm, mlp = block_parts(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.embed_positions = nn.Embedding(config.max_seq_len, config.dim) if config.pos == "learned" else None
        self.layers = nn.ModuleList(Block(config, norm, mlp) for _ in range(config.n_layers))
        self.norm = norm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", torch.empty(0), persistent=False)
        # Training only: recompute each block's activations in backward (TrainConfig.activation_checkpointing).
        self.activation_checkpointing = False
        self.reset_rope()
        if not self.embed_tokens.weight.is_meta:  # a meta model (sizes, or a checkpoint about to be assigned)
            self.init_weights()

    def init_weights(self) -> None:
        """N(0, 0.02) weights, output projections of residual branches N(0, 0.02 / sqrt(2 L)) (GPT-2), norms 1."""
        self.apply(self._init_weights)
        # Scaling each residual branch's output by 1/sqrt(2 L) keeps the residual stream's variance flat in depth.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "fc2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.config.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def reset_rope(self) -> None:
        """(Re)compute the RoPE frequencies in float32 on the weights' device."""
        c = self.config
        device = self.embed_tokens.weight.device
        inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling) if c.pos == "rope" else torch.empty(0)
        self.inv_freq = inv_freq.to(device)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Llama:
        super()._apply(fn, recurse)
        # model.to(bfloat16) would round the frequencies, and positions * theta_i would lose whole radians.
        if self.embed_tokens.weight.device.type != "meta":
            self.reset_rope()
        return self

    def make_cache(
        self,
        batch: int,
        max_len: int | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> nn.ModuleList:
        """A static key/value cache per layer, ``(batch, n_kv_heads, max_len, head_dim)`` each."""
        c, w = self.config, self.embed_tokens.weight
        max_len = max_len or c.max_seq_len
        if max_len > c.max_seq_len:
            raise ShapeError(f"make_cache: max_len {max_len} exceeds the model's max_seq_len {c.max_seq_len}")
        return nn.ModuleList(
            KVCache(batch, c.n_kv_heads, max_len, c.head_dim, dtype=dtype or w.dtype, device=device or w.device)
            for _ in range(c.n_layers)
        )

    @torch.no_grad()
    def fused_decode_weights(self, out: FusedWeights | None = None) -> FusedWeights:
        """Per layer, ``[W_q; W_k; W_v]`` and (bias-free SwiGLU, else None) ``[W_gate; W_up]``, stacked by rows.

        Copies for decoding: one matrix-vector product per group reads the same bytes as three (two)
        small ones in one larger kernel. The parameters keep their names and layout. ``out`` (an
        earlier result) is refilled in place, so its addresses stay valid in a captured CUDA graph.
        """
        fused: FusedWeights = []
        for i, layer in enumerate(self.layers):
            a, m = layer.self_attn, layer.mlp
            groups = [[a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], None]
            if isinstance(m, SwiGLU) and m.gate_proj.bias is None and m.up_proj.bias is None:
                groups[1] = [m.gate_proj.weight, m.up_proj.weight]
            pair = [
                None if ws is None else torch.cat(ws) if out is None else torch.cat(ws, out=out[i][j])
                for j, ws in enumerate(groups)
            ]
            fused.append((pair[0], pair[1]))
        return fused

    def unplain_reason(self) -> str:
        """Why decode paths that read projection weights directly (stacked, chain) would not run this model
        exactly ("" when they would): a projection wrapped by an adapter (notelab.peft), a KV prefix hook."""
        plain = {"embed_tokens": nn.Embedding, "lm_head": nn.Linear}
        mods = [(n, getattr(self, n), t) for n, t in plain.items()]
        for i, b in enumerate(self.layers):
            a, m = b.self_attn, b.mlp
            if type(a) is not Attention or a.kv_prefix is not None:
                return f"layers.{i}.self_attn is not the plain Attention (an adapter or a KV prefix is attached)"
            projections = [n for n in ("gate_proj", "up_proj", "down_proj", "fc1", "fc2") if hasattr(m, n)]
            if type(m) not in (SwiGLU, FeedForward) or len(projections) < 2:
                return f"layers.{i}.mlp is {type(m).__name__}, not the plain feed-forward (an adapter wraps it)"
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                mods.append((f"layers.{i}.self_attn.{n}", getattr(a, n), nn.Linear))
            mods += [(f"layers.{i}.mlp.{n}", getattr(m, n), nn.Linear) for n in projections]
        for name, mod, kind in mods:
            if type(mod) is not kind:
                return f"{name} is {type(mod).__name__}, not a plain nn.{kind.__name__} (an unmerged adapter)"
        return ""

    def check_tokens(self, tokens: torch.Tensor, start_pos: int | torch.Tensor = 0) -> None:
        """Raise :class:`ShapeError` unless ``tokens`` are (B, T) integer ids in the vocabulary within max_seq_len."""
        c = self.config
        if tokens.ndim != 2 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ShapeError(f"Llama: expected integer token ids (B, T), got {tuple(tokens.shape)} {tokens.dtype}")
        if isinstance(start_pos, int) and start_pos + tokens.shape[1] > c.max_seq_len:
            raise ShapeError(
                f"Llama: sequence reaches position {start_pos + tokens.shape[1]}, past max_seq_len {c.max_seq_len}"
            )
        if tokens.numel():
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= c.vocab_size:
                raise ShapeError(f"Llama: token ids must lie in [0, {c.vocab_size}), got ids in [{lo}, {hi}]")

    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: int | torch.Tensor = 0,
        *,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: nn.ModuleList | None = None,
        logits_to_keep: int = 0,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Logits ``(B, T, V)`` (the last ``logits_to_keep`` positions if > 0) for ``tokens`` ``(B, T)``.

        ``start_pos``: where the tokens go in ``cache`` (and their default positions
        ``start_pos + t``). An int writes slots ``start_pos..start_pos+T-1`` and attends to the
        filled prefix; a 0-d tensor does the same on the whole static cache (constant shapes, for a
        compiled decode step), masking slots after the current one; a ``(B,)`` tensor gives each row its
        own slot (the batched decode engine, ``notelab.lm.engine``).
        ``positions``: ``(T,)`` or ``(B, T)`` token positions, per row for left-padded batches.
        ``attention_mask``: ``(B, S)`` bool / 0-1, True at real tokens and False at padding, over the
        cache slots from 0 (``S >= start_pos + T``; with a tensor ``start_pos``, ``S`` = cache length).
        ``return_hidden``: the final hidden states ``RMSNorm(h_L)`` ``(B, T, dim)`` instead of the
        logits, for a loss that applies ``lm_head`` itself (``notelab.lm.loss.linear_cross_entropy``).
        """
        if not torch.compiler.is_compiling():
            self.check_tokens(tokens, start_pos)
        if return_hidden:
            return self._hidden(tokens, start_pos, positions, attention_mask, cache, logits_to_keep)
        return self._forward(tokens, start_pos, positions, attention_mask, cache, logits_to_keep)

    def _forward(
        self,
        tokens: torch.Tensor,
        start_pos: int | torch.Tensor,
        positions: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        cache: nn.ModuleList | None,
        logits_to_keep: int,
    ) -> torch.Tensor:
        """Logits of the last ``logits_to_keep`` positions (all if 0): ``lm_head`` over :meth:`_hidden`."""
        return self.lm_head(self._hidden(tokens, start_pos, positions, attention_mask, cache, logits_to_keep))

    def _hidden(
        self,
        tokens: torch.Tensor,
        start_pos: int | torch.Tensor,
        positions: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        cache: nn.ModuleList | None,
        logits_to_keep: int,
    ) -> torch.Tensor:
        """The final hidden states ``RMSNorm(h_L)`` (the last ``logits_to_keep`` positions if > 0)."""
        B, T = tokens.shape
        static = isinstance(start_pos, torch.Tensor)
        # a 0-d start gives slots (T,) shared by the batch; a (B,) start (one position per row) gives (B, T)
        slots = start_pos[..., None] + torch.arange(T, device=tokens.device) if static else None
        if positions is None:
            positions = slots if static else torch.arange(start_pos, start_pos + T, device=tokens.device)
        x = self.embed_tokens(tokens)
        rope = None
        if self.embed_positions is not None:
            x = x + self.embed_positions(positions)
        else:
            cos, sin = rope_cos_sin(positions, self.inv_freq)
            rope = (cos[:, None], sin[:, None]) if cos.ndim == 3 else (cos, sin)  # (B, 1, T, D) for per-row positions
        mask, is_causal = self._mask(T, start_pos, slots, attention_mask, cache, tokens.device)
        recompute = self.activation_checkpointing and cache is None and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            args = (x, rope, mask, is_causal, None if cache is None else cache[i], slots if static else start_pos)
            # Non-reentrant checkpointing: keeps only the block's input, reruns the block in backward.
            x = checkpoint(layer, *args, use_reentrant=False) if recompute else layer(*args)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.norm(x)

    def _mask(
        self,
        T: int,
        start_pos: int | torch.Tensor,
        slots: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        cache: nn.ModuleList | None,
        device: torch.device,
    ) -> tuple[torch.Tensor | None, bool]:
        """The boolean attention mask over the keys (True = attend) and whether SDPA adds the causal part."""
        if slots is not None:  # static cache: key slot j is visible from query slot s when j <= s
            n_keys = cache[0].max_len
            mask = torch.arange(n_keys, device=device) <= slots[..., None]  # (T, S), or (B, T, S) per row
            if mask.ndim == 3:
                mask = mask[:, None]  # (B, 1, T, S)
            if attention_mask is not None:
                mask = mask & attention_mask.bool()[:, None, None, :]
            return mask, False
        n_keys = start_pos + T if cache is not None else T
        if attention_mask is None:
            # One new query sees every cached key; longer blocks get the bottom-right causal mask.
            return None, T > 1
        if attention_mask.shape[1] < n_keys:
            raise ShapeError(f"Llama: attention_mask covers {attention_mask.shape[1]} positions, keys need {n_keys}")
        pad = attention_mask[:, :n_keys].bool()[:, None, None, :]  # (B, 1, 1, S)
        causal = torch.arange(n_keys, device=device)[None, :] <= torch.arange(T, device=device)[:, None] + n_keys - T
        return pad & causal, False
