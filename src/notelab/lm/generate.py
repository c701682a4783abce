"""Autoregressive generation with a static KV cache: greedy, temperature, top-k, top-p, repetition penalty.

Each step picks ``x_{t+1} ~ p(. | x_{<=t})`` from the logits of the last position, processed in
the order Hugging Face uses:

    repetition penalty  l_i <- l_i / r if l_i > 0 else l_i * r, for tokens already in the sequence
                        (Keskar et al. 2019, "CTRL", section 4.1)
    temperature         l <- l / tau;  tau = 0 means greedy (argmax), as in the reference Llama code
    top-k               keep the k largest logits (Fan et al. 2018)
    top-p (nucleus)     keep the smallest set of tokens whose probability reaches p (Holtzman et al. 2020)

Prompts of different lengths are left-padded into one batch; an attention mask hides the padding
and each row's positions start at 0 at its first real token, so a padded row computes what it
would alone. The prompt is run once (prefill), then one token per step reads the cache.

Two decode steps: "dynamic" attends to the filled prefix of the cache (``KVCache.update``);
"static" writes with ``KVCache.write`` and masks the whole preallocated cache, so every step has
the same shapes and ``torch.compile`` (with CUDA graphs on GPU) compiles it once.

Greedy static decoding has a fast path (``_greedy_step``): the step reads the current token and
the slot counter from fixed device buffers, takes the argmax, writes the next token back into the
token buffer and into a preallocated output row, and advances the counter, all in place. On GPU
the whole step is one captured CUDA graph, so a token costs one graph replay; the host reads the
output every ``sync_every`` tokens (stop tokens and streaming), one chunk behind the device.

Batch-1 decoding reads every weight once per token, so it is bound by memory bandwidth, and the
small projections (k and v are ``dim x dim/4`` for GQA) are bound by kernel launches instead. The
fast path therefore multiplies by stacked copies ``[W_q; W_k; W_v]`` and ``[W_gate; W_up]``
(``Llama.fused_decode_weights``, refreshed at each call) and splits the product, which is the same
arithmetic in fewer, larger kernels. ``decode_attention="matmul"`` (or ``"reduce"``: sums of
products) computes the step's attention ``softmax(q K^T / sqrt(D) + M) V`` over the whole cache
in float32 as plain tensor ops instead of SDPA, which the compiler can fuse with the ops around it.
``decode_matvec="reduce"`` does the same for the layers' matrix-vector products (``matvec_sum``):
compiled, each becomes one reduction kernel that also computes the RMSNorm before it, the SiLU
product before ``down_proj`` and the residual add after it, instead of a cuBLAS call between
small elementwise kernels. The greedy step's argmax runs in two passes (``chunked_argmax``), which
spreads the 128K-entry vocabulary over many thread blocks.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from notelab.core.attention import attention
from notelab.core.errors import ConfigError, ShapeError, unknown_name
from notelab.core.norms import RMSNorm
from notelab.core.rope import apply_rope, rope_cos_sin
from notelab.lm.chain import DecodeChain, chain_unsupported
from notelab.lm.model import FusedWeights, Llama

Prompts = Sequence[Sequence[int]] | torch.Tensor


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on ``logits`` ``(B, V)`` at the tokens where ``seen`` ``(B, V)`` is True."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set all but the ``k`` largest logits of each row to -inf."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose total probability is >= ``p`` (at least one)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # A token is dropped when the tokens ranked above it already reach p.
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row ``(B,)`` from last-position logits ``(B, V)`` (greedy when temperature is 0)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


def left_pad(
    prompts: Prompts, pad_id: int = 0, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> ``tokens (B, P)`` left-padded with ``pad_id`` and ``mask (B, P)`` (True at real tokens)."""
    if isinstance(prompts, torch.Tensor):
        tokens = prompts[None] if prompts.ndim == 1 else prompts
        if tokens.ndim != 2 or tokens.shape[1] == 0:
            raise ShapeError(f"generate: expected prompts (B, P) with P >= 1, got {tuple(prompts.shape)}")
        return tokens.long().to(device), torch.ones(tokens.shape, dtype=torch.bool, device=device)
    rows = [list(map(int, p)) for p in prompts]
    if not rows or min(len(r) for r in rows) == 0:
        raise ShapeError("generate: expected at least one non-empty prompt, got an empty one")
    width = max(len(r) for r in rows)
    tokens = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows], device=device)
    return tokens, mask


def _decode_static(
    model: Llama,
    token: torch.Tensor,
    slot: torch.Tensor,
    positions: torch.Tensor | None,
    mask: torch.Tensor,
    cache: nn.ModuleList,
) -> torch.Tensor:
    """One decode step on the whole static cache; every argument keeps its shape from step to step."""
    return model._forward(token, slot, positions, mask, cache, 1)[:, -1].float()


_COMPILED: dict[str, Callable] = {}


def compiled_decode_step(mode: str | None = "reduce-overhead") -> Callable:
    """``torch.compile`` of the static decode step (one compiled function per mode, reused across calls)."""
    key = str(mode)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(_decode_static, mode=mode, fullgraph=True, dynamic=False)
    return _COMPILED[key]


_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _reusable_cache(model: Llama, batch: int, max_len: int, dtype: torch.dtype) -> nn.ModuleList:
    """One cache per model and shape, kept across calls: new buffers would make the compiled step recompile.

    Reuse is safe: prefill overwrites slots ``[0, P)`` and each step masks the slots after its own.
    """
    key = (batch, max_len, dtype)
    held = _CACHES.get(model)
    if held is None or held[0] != key:
        cache = model.make_cache(batch, max_len, dtype=dtype)
        for kv in cache:  # CUDA graphs read the buffers in place instead of copying them in each step
            torch._dynamo.mark_static_address(kv.k)
            torch._dynamo.mark_static_address(kv.v)
        held = _CACHES[model] = (key, cache)
    return held[1]


DECODE_ATTENTION = ("sdpa", "matmul", "reduce")
DECODE_MATVEC = ("cublas", "reduce", "triton", "chain")


def matvec_sum(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` as a float32 sum of products, ``x`` ``(..., K)``, ``w`` ``(N, K)`` -> ``(..., N)`` in x's dtype.

    For decoding under ``torch.compile`` only: eager, it materialises the ``(..., N, K)`` products.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    return (x.to(acc)[..., None, :] * w.to(acc)).sum(-1).to(x.dtype)


def chunked_argmax(x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """``x.argmax(-1, keepdim=True)`` in two passes: the maximum of each ``chunk`` of the last axis, then
    the first chunk holding the overall maximum and the first maximum inside it (the same index,
    ties included: the first occurrence)."""
    *lead, n = x.shape
    k = -(-n // chunk)
    blocks = F.pad(x, (0, k * chunk - n), value=float("-inf")).view(*lead, k, chunk)
    c = blocks.amax(-1).argmax(-1, keepdim=True)  # (..., 1)
    inside = blocks.gather(-2, c[..., None].expand(*lead, 1, chunk)).squeeze(-2)  # (..., chunk)
    return c * chunk + inside.argmax(-1, keepdim=True)


def matmul_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, *, elementwise: bool = False
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(D) + M) v`` in at least float32 as two matmuls (or, ``elementwise``, two sums
    of products), for a few queries against a cache.

    ``q`` ``(B, Hq, T, D)``, ``k, v`` ``(B, Hkv, S, D)``, ``mask`` bool ``(T, S)`` or ``(B, 1, T, S)``
    (every query sees at least one key, as in decoding). The ``G = Hq / Hkv`` query heads of a group
    become a batch axis of their shared key/value head, so nothing is repeated.
    """
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)  # bf16 inputs, float32 scores and softmax
    qg = q.reshape(b, hkv, hq // hkv, t, d).to(acc)
    kk, vv = k[:, :, None].to(acc), v[:, :, None].to(acc)  # (B, Hkv, 1, S, D)
    if elementwise:  # products and sums: a compiler fuses the casts into its reduction kernels
        scores = (qg[..., None, :] * kk[..., None, :, :]).sum(-1)
    else:
        scores = qg @ kk.transpose(-1, -2)  # (B, Hkv, G, T, S)
    m = mask if mask.ndim == 4 else mask[None, None]
    p = (scores * d**-0.5).masked_fill(~m[:, :, None], float("-inf")).softmax(dim=-1)
    out = (p[..., None] * vv[..., None, :, :]).sum(-2) if elementwise else p @ vv
    return out.reshape(b, hq, t, d).to(q.dtype)


def _decode_forward(
    model: Llama,
    fused: FusedWeights | None,
    tok: torch.Tensor,
    slot: torch.Tensor,
    positions: torch.Tensor | None,
    mask: torch.Tensor,
    cache: nn.ModuleList,
    attn: str,
    matvec: str = "cublas",
) -> torch.Tensor:
    """``Llama._forward`` for one static decode step, with stacked projections and a choice of attention
    and of matrix-vector product (``DECODE_MATVEC``; ``lm_head`` always multiplies with cuBLAS).

    Only the decode step's shapes are handled: ``tok`` ``(B, T)`` at cache slots ``slot + [0, T)``,
    ``positions`` ``(B, T)`` or None (the slots), ``mask`` ``(B, S)`` over the whole cache.
    """
    B, T = tok.shape
    slots = slot + torch.arange(T, device=tok.device)
    positions = slots if positions is None else positions
    x = model.embed_tokens(tok)
    rope = None
    if model.embed_positions is not None:
        x = x + model.embed_positions(positions)
    else:
        cos, sin = rope_cos_sin(positions, model.inv_freq)
        rope = (cos[:, None], sin[:, None]) if cos.ndim == 3 else (cos, sin)
    m, _ = model._mask(T, slot, slots, mask, cache, tok.device)
    lin = matvec_sum if matvec == "reduce" else F.linear
    # "triton": each product one notelab.lm.kernels launch, with the RMSNorm, SiLU product or residual inside
    kernel = matvec == "triton" and fused is not None and isinstance(model.norm, RMSNorm) and fused[0][1] is not None
    if kernel:
        from notelab.lm.kernels import fused_matvec
    D = x.shape[-1]
    for i, layer in enumerate(model.layers):
        a = layer.self_attn
        w_qkv, w_gate_up = fused[i] if fused is not None else (None, None)
        hq, hkv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
        if kernel:
            qkv = fused_matvec(x.reshape(B * T, D), w_qkv, norm_weight=n1.weight, eps=n1.eps).view(B, T, -1)
            q, k, v = qkv.split([hq, hkv, hkv], dim=-1)
        elif w_qkv is None:
            h = n1(x)
            q, k, v = (lin(h, p.weight) for p in (a.q_proj, a.k_proj, a.v_proj))
        else:
            q, k, v = lin(n1(x), w_qkv).split([hq, hkv, hkv], dim=-1)
        q = q.reshape(B, T, a.n_heads, a.head_dim).transpose(1, 2)
        k = k.reshape(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
        v = v.reshape(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k, v = cache[i].write(slots, k, v)
        k, v = k.to(q.dtype), v.to(q.dtype)
        if attn == "sdpa":
            y = attention(q, k, v, mask=m)
        else:
            y = matmul_attention(q, k, v, m, elementwise=attn == "reduce")
        y = y.transpose(1, 2).reshape(B, T, hq)
        if kernel:
            x2 = fused_matvec(y.reshape(B * T, hq).contiguous(), a.o_proj.weight, residual=x.reshape(B * T, D))
            gate_up = fused_matvec(x2, w_gate_up, norm_weight=n2.weight, eps=n2.eps)
            x = fused_matvec(gate_up, layer.mlp.down_proj.weight, silu_mul=True, residual=x2).view(B, T, D)
            continue
        x = x + lin(y, a.o_proj.weight)
        h = n2(x)
        if w_gate_up is None:
            x = x + layer.mlp(h)
        else:
            gate, up = lin(h, w_gate_up).chunk(2, dim=-1)
            x = x + lin(F.silu(gate) * up, layer.mlp.down_proj.weight)
    return model.lm_head(model.norm(x))


def _greedy_step(
    model: Llama,
    tok: torch.Tensor,
    slot: torch.Tensor,
    n_pad: torch.Tensor | None,
    mask: torch.Tensor,
    cache: nn.ModuleList,
    out: torch.Tensor,
    fused: FusedWeights | None = None,
    attn: str = "sdpa",
    matvec: str = "cublas",
) -> None:
    """One greedy step, in place: ``tok`` ``(B, 1)`` at cache slot ``slot`` (0-d) -> ``out[:, slot + 1]``, ``tok``.

    Every argument is a fixed buffer, so the step can be captured once and replayed for every token.
    ``fused``: stacked projection weights (``Llama.fused_decode_weights``) or None; ``attn``: one of
    ``DECODE_ATTENTION``; ``matvec``: one of ``DECODE_MATVEC``.
    """
    positions = None if n_pad is None else slot - n_pad  # per-row positions of a left-padded batch
    if fused is None and attn == "sdpa" and matvec == "cublas":
        logits = model._forward(tok, slot, positions, mask, cache, 1)[:, -1]
    else:
        logits = _decode_forward(model, fused, tok, slot, positions, mask, cache, attn, matvec)[:, -1]
    nxt = chunked_argmax(logits)  # argmax of bf16 logits equals that of their float32 copy
    tok.copy_(nxt)
    out.index_copy_(1, slot.view(1) + 1, nxt)
    slot.add_(1)


class _GreedyState:
    """The fixed buffers of the greedy fast path for one model and shape, and its captured CUDA graph."""

    def __init__(
        self,
        model: Llama,
        batch: int,
        total: int,
        dtype: torch.dtype,
        padded: bool,
        how: str,
        fuse: bool = False,
        attn: str = "sdpa",
        matvec: str = "cublas",
    ) -> None:
        device = model.embed_tokens.weight.device
        self.fused = model.fused_decode_weights() if fuse else None
        self.attn, self.matvec = attn, matvec
        self.chain: DecodeChain | None = None
        self.cache = model.make_cache(batch, total, dtype=dtype)
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros((), dtype=torch.long, device=device)
        self.n_pad = torch.zeros(batch, 1, dtype=torch.long, device=device) if padded else None
        self.mask = torch.ones(batch, total, dtype=torch.bool, device=device)
        self.out = torch.zeros(batch, total, dtype=torch.long, device=device)
        buffers = [self.tok, self.slot, self.mask, self.out] + [t for kv in self.cache for t in (kv.k, kv.v)]
        buffers += [w for pair in self.fused or [] for w in pair if w is not None]
        if matvec == "chain":  # the whole step as notelab.lm.chain's Triton kernels (stream() checked it can)
            self.chain = DecodeChain(model, self.fused, self.cache, self.tok, self.slot, self.out)
        for t in buffers + ([self.n_pad] if padded else []):
            torch._dynamo.mark_static_address(t)  # compiled CUDA graphs read these in place
        self.trees = how in ("reduce-overhead", "max-autotune")  # modes that record CUDA graphs themselves
        fn = _greedy_step if how == "eager" else _compiled_greedy(how)
        self.fn = fn
        self.graph: torch.cuda.CUDAGraph | None = None
        if device.type == "cuda" and not self.trees:
            self.graph = self._capture(model)
        # prompt length -> (token buffer, captured prefill); the most recent PREFILL_GRAPHS lengths are kept
        self.prefills: dict[int, tuple[torch.Tensor, torch.cuda.CUDAGraph]] = {}

    def refresh(self, model: Llama) -> None:
        """Copy the current weights into the stacked ones (in place): the model may have changed since capture."""
        if self.fused is not None:
            model.fused_decode_weights(out=self.fused)

    def step(self, model: Llama) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        if self.trees:
            torch.compiler.cudagraph_mark_step_begin()
        self._call(model)

    def _call(self, model: Llama) -> None:
        if self.chain is not None:
            self.chain.step()
            return
        args = (self.tok, self.slot, self.n_pad, self.mask, self.cache, self.out, self.fused, self.attn, self.matvec)
        self.fn(model, *args)

    def _prefill(
        self, model: Llama, tokens: torch.Tensor, positions: torch.Tensor | None, mask: torch.Tensor | None
    ) -> None:
        """Run the prompt ``tokens`` (B, P) into the cache; its greedy token into ``tok`` / ``out``, P into ``slot``."""
        P = tokens.shape[1]
        first = model._forward(tokens, 0, positions, mask, self.cache, 1)[:, -1].argmax(dim=-1, keepdim=True)
        self.tok.copy_(first)
        self.out[:, P : P + 1] = first
        self.slot.fill_(P)

    def prefill(
        self, model: Llama, tokens: torch.Tensor, positions: torch.Tensor | None, mask: torch.Tensor | None
    ) -> None:
        """``_prefill``; for an unpadded prompt (no positions or mask) on GPU, a CUDA graph replay where one was
        captured for this prompt length (the first run of a length warms up, the capture records, later calls
        replay)."""
        if self.graph is None or positions is not None or mask is not None:
            self._prefill(model, tokens, positions, mask)
            return
        P = tokens.shape[1]
        held = self.prefills.pop(P, None)
        if held is None:
            buf = tokens.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._prefill(model, buf, None, None)  # the real prefill, and the warm-up before the capture
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # records the same work again (nothing runs during a capture)
                self._prefill(model, buf, None, None)
            held = (buf, graph)
        else:
            held[0].copy_(tokens)
            held[1].replay()
        self.prefills[P] = held  # most recent last
        while len(self.prefills) > PREFILL_GRAPHS:
            self.prefills.pop(next(iter(self.prefills)))

    def _capture(self, model: Llama) -> torch.cuda.CUDAGraph:
        """Warm up (compile, pick kernels) on a side stream, then record one step; slot 0 keeps writes in range."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.slot.zero_()
                self._call(model)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._call(model)
        return graph


def _compiled_greedy(mode: str) -> Callable:
    key = f"greedy:{mode}"
    if key not in _COMPILED:
        # Coordinate-descent tuning of inductor's kernels (as gpt-fast does) also turns the one-row products
        # into tuned reductions: 5% faster decoding on an H200, for about twice the compile time.
        tuned = {"options": {"coordinate_descent_tuning": True}} if mode == "default" else {"mode": mode}
        _COMPILED[key] = torch.compile(_greedy_step, fullgraph=True, dynamic=False, **tuned)
    return _COMPILED[key]


_GREEDY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
PREFILL_GRAPHS = 4  # captured prompt forwards kept per fast-path state (one per prompt length)


def _greedy_state(
    model: Llama,
    batch: int,
    total: int,
    dtype: torch.dtype,
    padded: bool,
    how: str,
    fuse: bool = False,
    attn: str = "sdpa",
    matvec: str = "cublas",
) -> _GreedyState:
    """One fast-path state per model, kept across calls while the shape and the weights' storage stay the same.

    A CUDA graph replays fixed addresses: moving the model (``.to``) makes new weights and a new state.
    """
    w = model.embed_tokens.weight
    key = (batch, total, dtype, padded, how, fuse, attn, matvec, w.device, w.data_ptr(), model.inv_freq.data_ptr())
    held = _GREEDY.get(model)
    if held is None or held[0] != key:
        _GREEDY.pop(model, None)
        held = _GREEDY[model] = (key, _GreedyState(model, batch, total, dtype, padded, how, fuse, attn, matvec))
    return held[1]


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


@torch.inference_mode()
def stream(
    model: Llama,
    prompts: Prompts,
    max_new_tokens: int = 64,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_tokens: Sequence[int] = (),
    generator: torch.Generator | None = None,
    pad_id: int = 0,
    static: bool = False,
    compile: bool | str = False,
    sync_every: int = 1,
    fast_greedy: bool = True,
    fuse: bool = True,
    decode_attention: str = "auto",
    decode_matvec: str = "auto",
) -> Iterator[list[int | None]]:
    """Yield, step by step, the new token of every row (``None`` for rows already stopped).

    ``prompts``: lists of token ids (left-padded here), or a ``(B, P)`` / ``(P,)`` tensor taken as
    unpadded.

    A row stops after one of ``stop_tokens`` (which is not yielded) or after ``max_new_tokens``;
    generation also stops when the context (``max_seq_len``) is full. ``static`` uses the
    constant-shape decode step; ``compile`` compiles it (``True``: CUDA graphs on GPU, or a
    ``torch.compile`` mode string) and implies ``static``.

    Greedy static decoding (temperature 0, no repetition penalty) takes the fast path: on GPU one
    CUDA graph replay per token (``compile=True``: the inductor-compiled step captured by hand;
    ``compile="reduce-overhead"``: torch.compile's own CUDA graphs; ``static=True`` alone: the eager
    step captured; ``compile="max-autotune-no-cudagraphs"``: GEMMs tuned per shape, then captured,
    at about three times the compile time; with the stacked weights and "reduce" attention below,
    ``compile=True``, with inductor's coordinate-descent tuning, measured fastest on an H200). The host reads tokens
    every ``sync_every`` steps, so a stop token or a streamed token is seen up to ``sync_every``
    steps late (latency, and up to ``2 * sync_every`` wasted steps after the last row stops), while
    the device never waits for Python; the yielded tokens are the same for every ``sync_every``.
    On GPU the fast path also captures the forward of an unpadded prompt, once per prompt length (the last
    ``PREFILL_GRAPHS`` lengths are kept), and replays it for later prompts of that length.
    ``fast_greedy=False`` forces the general path (one host read per token, ops outside the graph).
    On the fast path, ``fuse`` multiplies by stacked ``[q; k; v]`` and ``[gate; up]`` weight copies
    (extra memory: those weights once more) and ``decode_attention`` (``"sdpa"``, ``"matmul"``, ``"reduce"``;
    ``"auto"``: "reduce" when compiled, else "sdpa") picks the step's attention; all give the tokens
    of the plain step up to rounding (equal in float32; bf16 rounding can flip near-ties).
    ``decode_matvec`` (``"cublas"``, ``"reduce"``, ``"triton"``, ``"chain"``; ``"auto"``: "chain" on CUDA where it
    runs, else "cublas") picks the layers'
    matrix-vector products; "reduce" is for compiled steps only; "triton" runs each product, with the
    RMSNorm before it, the SiLU product and the residual add, as one ``notelab.lm.kernels`` kernel
    (RMSNorm + SwiGLU models with ``fuse``; others take the "cublas" step); "chain" runs the whole step
    as ``notelab.lm.chain``'s Triton kernels with programmatic dependent launch, captured in a CUDA graph
    whatever ``compile`` says (batch 1 without padding, RMSNorm + SwiGLU + RoPE models with ``fuse``, on
    CUDA; ``chain_unsupported`` says why not, and those steps take "cublas").
    """
    if temperature < 0 or repetition_penalty <= 0 or (top_k is not None and top_k < 1):
        raise ConfigError(
            f"generate: expected temperature >= 0, repetition_penalty > 0 and top_k >= 1, got "
            f"{temperature}, {repetition_penalty}, {top_k}"
        )
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ConfigError(f"generate: expected top_p in (0, 1], got {top_p}")
    if sync_every < 1:
        raise ConfigError(f"generate: expected sync_every >= 1, got {sync_every}")
    if decode_attention not in (*DECODE_ATTENTION, "auto"):
        raise unknown_name("decode_attention", decode_attention, (*DECODE_ATTENTION, "auto"))
    if decode_matvec not in (*DECODE_MATVEC, "auto"):
        raise unknown_name("decode_matvec", decode_matvec, (*DECODE_MATVEC, "auto"))
    device = model.embed_tokens.weight.device
    tokens, prompt_mask = left_pad(prompts, pad_id, device)
    B, P = tokens.shape
    max_len = model.config.max_seq_len
    if P >= max_len:
        raise ShapeError(f"generate: prompt of {P} tokens leaves no room in the context of {max_len} tokens")
    model.check_tokens(tokens)
    steps = min(max_new_tokens, max_len - P)
    if steps <= 0:
        return
    total = P + steps
    padded = not bool(prompt_mask.all())
    mask = torch.ones(B, total, dtype=torch.bool, device=device)
    mask[:, :P] = prompt_mask
    n_pad = (~prompt_mask).sum(dim=1, keepdim=True)  # (B, 1)
    dtype = _autocast_dtype(device) or model.embed_tokens.weight.dtype
    static = static or bool(compile)
    if static and fast_greedy and temperature == 0.0 and repetition_penalty == 1.0:
        how = "eager" if not compile else ("default" if compile is True else compile)
        # Measured on an H200 (Llama-3.2-1B, batch 1): the compiled sums of products beat cuDNN attention
        # (5 against 9 us a layer); eager, they would materialise every product.
        attn = decode_attention if decode_attention != "auto" else ("sdpa" if how == "eager" else "reduce")
        matvec = decode_matvec
        if matvec == "auto":  # measured fastest on an H200 (Llama-3.2-1B, batch 1): the chain, where it runs
            matvec = "chain" if device.type == "cuda" else "cublas"
        if matvec == "chain":  # its own kernels, captured by hand; models or batches it does not cover: "cublas"
            matvec, how = ("cublas", how) if chain_unsupported(model, B, padded, dtype, fuse) else ("chain", "eager")
        state = _greedy_state(model, B, total, dtype, padded, how, fuse, attn, matvec)
        yield from _stream_greedy(model, state, tokens, prompt_mask, mask, n_pad, steps, stop_tokens, sync_every)
        return
    if compile:
        mode = "reduce-overhead" if compile is True and device.type == "cuda" else None
        step_fn = compiled_decode_step(compile if isinstance(compile, str) else mode)
        cache = _reusable_cache(model, B, total, dtype)
    else:
        step_fn = _decode_static
        cache = model.make_cache(B, total, dtype=dtype)
    seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
    if repetition_penalty != 1.0:
        seen.scatter_(1, tokens, prompt_mask)
    stops = {int(t) for t in stop_tokens}
    done = [False] * B
    done_t: torch.Tensor | None = None  # on the device, once some row has stopped
    n_done_t = 0
    slot = torch.tensor(P, device=device)

    def advance(tok: torch.Tensor, s: int) -> torch.Tensor:
        """Logits ``(B, V)`` after feeding ``tok`` ``(B,)`` at cache slot ``s``."""
        pos = (s - n_pad) if padded else None
        if static:
            if device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            cur = slot + (s - P)
            return step_fn(model, tok[:, None], cur, pos if padded else cur.view(1), mask, cache)
        return model._forward(tok[:, None], s, pos, mask[:, : s + 1] if padded else None, cache, 1)[:, -1].float()

    positions = (prompt_mask.long().cumsum(1) - 1).clamp(min=0) if padded else None
    logits = model._forward(tokens, 0, positions, mask[:, :P] if padded else None, cache, 1)[:, -1].float()
    for i in range(steps):
        if repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        tok = next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        if done_t is not None:
            tok = tok.masked_fill(done_t, pad_id)
        if repetition_penalty != 1.0:
            seen.scatter_(1, tok[:, None], True)
        # Queue the next step before reading this token on the host, so the device never waits for Python.
        host = tok.to("cpu", non_blocking=True)
        ready = torch.cuda.Event() if device.type == "cuda" else None
        if ready is not None:
            ready.record()
        if i < steps - 1:
            logits = advance(tok, P + i)
        if ready is not None:
            ready.synchronize()
        row_tokens: list[int | None] = []
        for row, t in enumerate(host.tolist()):
            done[row] = done[row] or t in stops
            row_tokens.append(None if done[row] else t)
        yield row_tokens
        if all(done):
            return
        if sum(done) != n_done_t:
            done_t, n_done_t = torch.tensor(done, device=device), sum(done)


def _stream_greedy(
    model: Llama,
    state: _GreedyState,
    tokens: torch.Tensor,
    prompt_mask: torch.Tensor,
    mask: torch.Tensor,
    n_pad: torch.Tensor,
    steps: int,
    stop_tokens: Sequence[int],
    sync_every: int,
) -> Iterator[list[int | None]]:
    """Greedy decoding on the fast path; yields what :func:`stream` yields, read back in chunks of ``sync_every``."""
    B, P = tokens.shape
    padded = state.n_pad is not None
    state.refresh(model)
    state.mask.copy_(mask)
    if padded:
        state.n_pad.copy_(n_pad)
    positions = (prompt_mask.long().cumsum(1) - 1).clamp(min=0) if padded else None
    state.prefill(model, tokens, positions, mask[:, :P] if padded else None)
    stops = {int(t) for t in stop_tokens}
    done = [False] * B
    cuda = state.out.device.type == "cuda"
    pending: tuple | None = None  # the chunk on its way to the host: (event, host tensor)
    for a in range(0, steps, sync_every):
        b = min(a + sync_every, steps)
        for _ in range(max(a, 1), b):  # token j (j >= 1) comes from step j
            state.step(model)
        host = state.out[:, P + a : P + b].to("cpu", non_blocking=True)
        ready = torch.cuda.Event() if cuda else None
        if ready is not None:
            ready.record()
        # Read the previous chunk only now, so the device computes this one while Python handles that one.
        if pending is not None:
            yield from _chunk_rows(pending, done, stops)
            if all(done):
                return
        pending = (ready, host)
    yield from _chunk_rows(pending, done, stops)


def _chunk_rows(pending: tuple, done: list[bool], stops: set[int]) -> Iterator[list[int | None]]:
    """The steps of one chunk ``(B, n)`` on the host, with stopped rows as ``None``; ends once every row stopped."""
    ready, host = pending
    if ready is not None:
        ready.synchronize()
    for column in host.T.tolist():
        row_tokens: list[int | None] = []
        for row, t in enumerate(column):
            done[row] = done[row] or t in stops
            row_tokens.append(None if done[row] else t)
        yield row_tokens
        if all(done):
            return


def generate(
    model: Llama,
    prompts: Prompts,
    max_new_tokens: int = 64,
    *,
    callback: Callable[[int, int], None] | None = None,
    **kwargs,
) -> list[list[int]]:
    """New tokens for each prompt (stop tokens not included); ``callback(row, token)`` streams them.

    ``kwargs`` are those of :func:`stream` (temperature, top_k, top_p, repetition_penalty,
    stop_tokens, generator, pad_id, static, compile, sync_every, fast_greedy, fuse, decode_attention,
    decode_matvec).
    """
    n = 1 if isinstance(prompts, torch.Tensor) and prompts.ndim == 1 else len(prompts)
    out: list[list[int]] = [[] for _ in range(n)]
    was_training = model.training
    model.eval()
    try:
        for step in stream(model, prompts, max_new_tokens, **kwargs):
            for row, tok in enumerate(step):
                if tok is not None:
                    out[row].append(tok)
                    if callback is not None:
                        callback(row, tok)
    finally:
        model.train(was_training)
    return out
