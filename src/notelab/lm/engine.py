"""A batched decode engine: requests join and leave a running batch between steps (continuous batching).

Each request owns one row ("slot") of a static KV cache of ``max_batch`` rows and ``max_len`` slots; its
prompt sits at cache slots ``[0, P)`` and its token ``t`` (counting the prompt) at slot ``t``, so rows
never shift and a row's computation does not depend on the others (Yu et al. 2022, "Orca": iteration-level
scheduling). One ``step()``:

    admit    queued requests take free rows; prompts of one length run as one forward (prefill) into a
             small cache copied into their rows; each gets its first token from the prompt's last logits
    decode   every row feeds its last token at its own slot p_b:  k, v -> cache[b, :, p_b];
             attention over the keys j <= p_b (on CUDA by the Triton kernels of ``notelab.lm.attend``, else
             by two batched products, ``decode_attention``); the next token by
             ``notelab.lm.sampling.choose_tokens`` (on CUDA with the kernels of ``notelab.lm.nucleus``);
             p_b += 1 for active rows (free rows stay at slot 0)

The decode step has the same shapes whatever the requests are, so on CUDA it is compiled once
(``torch.compile``, inductor) and captured in a CUDA graph, one graph per kind of processing the batch
needs (``Sampler``: greedy, sampled, with filters, penalty, log-probs), and replayed each step. Sampling
happens inside the graph from counter-based noise (seed, token index), so a request's sampled tokens do
not depend on its batch or on the path that decoded it.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from notelab.core.attention import KVCache
from notelab.core.errors import ConfigError, ShapeError
from notelab.core.norms import rms_scale
from notelab.core.rope import apply_rope
from notelab.lm.attend import attend_unsupported, rope_attention
from notelab.lm.folded import folded_forward, folded_unsupported, folded_weights
from notelab.lm.model import FusedWeights, Llama, decode_inputs, split_qkv
from notelab.lm.nucleus import draw_tokens, pivot_threshold, pivot_unsupported
from notelab.lm.sampling import (
    FactualNucleus,
    Sampler,
    advance_sentence,
    bisect_threshold,
    choose_tokens,
    filter_threshold,
    gumbel_argmax,
    top_p_value,
)

RECOMPILE_LIMIT = 64  # compiled versions kept per decode function (kinds of processing x shapes)
PREFILL_GRAPHS = 8  # prompt shapes (count, length) whose forward an engine on CUDA keeps captured by default


@dataclass
class SamplingParams:
    """How one request is decoded: at most ``max_new_tokens`` new tokens; greedy when ``temperature`` is 0."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | FactualNucleus | None = None  # a FactualNucleus decays it within sentences
    repetition_penalty: float = 1.0
    stop_tokens: tuple[int, ...] = ()
    seed: int | None = None  # per-request seed (reproducible sampling); None draws one from torch's generator
    logprobs: bool = False


@dataclass
class TokenEvent:
    request_id: int
    token: int | None  # None when the request ended without a new token (stop token, context full)
    logprob: float | None  # log p(token) under the unprocessed, temperature-1 model distribution, when asked
    finished: bool
    finish_reason: str | None  # "stop" | "length" | None


def check_params(params: SamplingParams, vocab: int) -> None:
    """Raise :class:`ConfigError` naming the first setting out of range."""
    p = params
    if p.max_new_tokens < 1:
        raise ConfigError(f"generate: expected max_new_tokens >= 1, got {p.max_new_tokens}")
    if p.temperature < 0 or p.repetition_penalty <= 0 or (p.top_k is not None and p.top_k < 1):
        raise ConfigError(
            f"generate: expected temperature >= 0, repetition_penalty > 0 and top_k >= 1, got "
            f"{p.temperature}, {p.repetition_penalty}, {p.top_k}"
        )
    if isinstance(p.top_p, FactualNucleus):
        bad = [t for t in p.top_p.sentence_end_ids if not 0 <= t < vocab]
        if bad:
            raise ConfigError(f"generate: expected FactualNucleus sentence_end_ids in [0, {vocab}), got {bad[:3]}")
    elif p.top_p is not None and not 0.0 < p.top_p <= 1.0:
        raise ConfigError(f"generate: expected top_p in (0, 1] or a FactualNucleus, got {p.top_p}")
    bad = [t for t in p.stop_tokens if not 0 <= int(t) < vocab]
    if bad:
        raise ConfigError(f"generate: expected stop tokens in [0, {vocab}), got {bad[:3]}")


def check_prompt(prompt: Sequence[int], vocab: int, max_len: int) -> list[int]:
    """The prompt as a list of ints; :class:`ShapeError` if empty, out of the vocabulary or with no room left."""
    ids = [int(t) for t in prompt]
    if not ids:
        raise ShapeError("generate: expected a non-empty prompt, got an empty one")
    if len(ids) >= max_len:
        raise ShapeError(f"generate: prompt of {len(ids)} tokens leaves no room in the context of {max_len} tokens")
    lo, hi = min(ids), max(ids)
    if lo < 0 or hi >= vocab:
        raise ShapeError(f"Llama: token ids must lie in [0, {vocab}), got ids in [{lo}, {hi}]")
    return ids


def sampler_for(params: Sequence[SamplingParams]) -> Sampler:
    """The processing a batch of requests needs (``Sampler``), from their settings."""
    ps = [p for p in params if p.temperature > 0]
    return Sampler(
        sample=bool(ps),
        filter=any(p.top_k or p.top_p for p in ps),
        top_k=any(p.top_k for p in ps),
        penalty=any(p.repetition_penalty != 1.0 for p in params),
        logprobs=any(p.logprobs for p in params),
        factual=any(isinstance(p.top_p, FactualNucleus) for p in ps),
    )


def nucleus_rows(params: Sequence[SamplingParams], vocab: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Per row, the factual-nucleus decay ``(B, 1)``, floor ``(B, 1)``, sentence length 0 ``(B,)`` and the
    sentence-ending ids ``(B, V)`` bool; rows with a plain top-p get decay 1 and floor 0 (no change)."""
    fn = [p.top_p if isinstance(p.top_p, FactualNucleus) else None for p in params]
    both = [[1.0, 0.0] if f is None else [f.decay, f.floor] for f in fn]
    decay, floor = torch.tensor(both, dtype=torch.float32).to(device).split(1, dim=1)  # one copy to the device
    ends = torch.zeros(len(params), vocab, dtype=torch.bool, device=device)
    for b, f in enumerate(fn):
        if f is not None and f.sentence_end_ids:
            ends[b, sorted(f.sentence_end_ids)] = True
    return decay, floor, torch.zeros(len(params), dtype=torch.long, device=device), ends


def random_seed() -> int:
    """A seed from torch's default generator (so ``torch.manual_seed`` makes unseeded sampling repeatable)."""
    return int(torch.randint(0, 2**31 - 1, ()))


@dataclass
class _Prefill:
    """A captured prompt forward: its input buffers (prompt tokens, cache rows), the graph and its logits."""

    tokens: torch.Tensor
    rows: torch.Tensor
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor | None = None


@dataclass
class _Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    seed: int
    budget: int  # new tokens allowed: max_new_tokens, or fewer where the context ends first
    row: int = -1
    made: int = 0
    cancelled: bool = False
    stops: frozenset[int] = field(default_factory=frozenset)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor) -> torch.Tensor:
    """Attention of one query a row over a whole static cache, as two batched matrix products:

        s_hj = q_h . k_gj / sqrt(D)  (query head h reads kv head g = h // (Hq / Hkv)),
        w_h = softmax_j(s_hj masked to -inf where mask_j is False),   y_h = sum_j w_hj v_gj

    (Vaswani et al. 2017, eq. 1), the ``Hq / Hkv`` query heads of a group as the rows of one product in the
    cache's dtype, the softmax in float32. ``q`` ``(B, Hq, 1, D)``, ``k``, ``v`` ``(B, Hkv, L, D)``, ``mask`` bool
    broadcastable to ``(B, 1, 1, L)``. In the compiled batched step on an H200 (Llama-3.2-1B shape, batch 8) it
    beat SDPA (cuDNN), inductor's sums of products and a Triton kernel reading only each row's visible keys; the
    Triton kernels of ``notelab.lm.attend`` beat it in turn (benchmarks/RESULTS.md) and replace it on CUDA."""
    B, Hq, _, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    qg = q.reshape(B, Hkv, Hq // Hkv, D)
    scores = (qg @ k.transpose(-1, -2)).float() * D**-0.5  # (B, Hkv, G, L)
    scores = scores.masked_fill(~mask.reshape(B, 1, 1, L), float("-inf"))
    y = scores.softmax(dim=-1).to(v.dtype) @ v  # (B, Hkv, G, D)
    return y.reshape(B, Hq, 1, D)


def rotated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: KVCache,
    pos: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    norm: tuple[torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """The stacked step's attention in torch, for the new token of each row: RoPE of ``q`` ``(B, Hq, 1, D)`` and ``k``
    ``(B, Hkv, 1, D)`` by ``rope`` (cos, sin of the rows' slots ``pos``; None: none), ``k``, ``v`` written into
    ``cache`` at ``pos[b]``, then :func:`decode_attention` over it, row ``b`` seeing keys ``0..pos[b]``. ``norm`` =
    (x ``(B, dim)``, eps): q, k, v first scaled by the RMSNorm statistic of the residual rows x, 1 / sqrt(mean(x^2)
    + eps) (its gain folded into the weights: ``notelab.lm.folded``)."""
    if norm is not None:
        r = rms_scale(*norm).view(-1, 1, 1, 1)
        q, k, v = ((t.float() * r).to(t.dtype) for t in (q, k, v))
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    keys, values = cache.write(pos[:, None], k, v)
    mask = (torch.arange(keys.shape[2], device=keys.device) <= pos[:, None]).view(-1, 1, 1, keys.shape[2])
    return decode_attention(q, keys.to(q.dtype), values.to(q.dtype), mask=mask)


def compile_step(fn: Callable) -> Callable:
    """The decode step compiled by inductor as one graph of fixed shapes (``torch.compile``'s default mode)."""
    return torch.compile(fn, fullgraph=True, dynamic=False)


def stacked_forward(
    model: Llama,
    fused: FusedWeights,
    tok: torch.Tensor,
    pos: torch.Tensor,
    cache: nn.ModuleList,
    attention: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """``Llama._forward`` for one token a row, ``tok`` ``(B, 1)`` at cache slots ``pos`` ``(B,)``, multiplying by
    the stacked ``[W_q; W_k; W_v]`` and ``[W_gate; W_up]`` of ``Llama.fused_decode_weights``: the same
    arithmetic as the layers' own projections, in two kernels instead of five (a decode step is bound by
    its kernels' count and their weight reads, not by arithmetic); attention by :func:`decode_attention`.
    ``attention(q, k, v, cache, pos, rope)``: the new token's attention, its key and value written into the layer's
    cache at ``pos[b]`` (None: :func:`rotated_attention`), e.g. ``notelab.lm.attend.rope_attention``."""
    B = tok.shape[0]
    x, rope = decode_inputs(model, tok, pos)
    attention = attention or rotated_attention
    for i, layer in enumerate(model.layers):
        a = layer.self_attn
        w_qkv, w_gate_up = fused[i]
        q, k, v = split_qkv(F.linear(layer.input_layernorm(x), w_qkv), a)
        y = attention(q, k, v, cache[i], pos, rope)
        x = x + a.o_proj(y.transpose(1, 2).reshape(B, 1, -1))
        h = layer.post_attention_layernorm(x)
        if w_gate_up is None:
            x = x + layer.mlp(h)
        else:
            gate, up = F.linear(h, w_gate_up).chunk(2, dim=-1)
            x = x + layer.mlp.down_proj(F.silu(gate) * up)
    return model.lm_head(model.norm(x))


@dataclass(frozen=True)
class StackedLayers:
    """How the stacked decode step runs the layers: ``weights(model, out=None)`` the weight copies it multiplies by
    (``out``, an earlier result, refilled in place), ``forward(model, weights, tok, pos, cache, attention)`` the
    logits ``(B, 1, V)`` over them, ``unsupported(model)`` why it cannot run a model ("" when it can)."""

    weights: Callable[..., FusedWeights]
    forward: Callable[..., torch.Tensor]
    unsupported: Callable[[Llama], str]


STACKED = StackedLayers(Llama.fused_decode_weights, stacked_forward, Llama.unplain_reason)
FOLDED = StackedLayers(folded_weights, folded_forward, folded_unsupported)  # the RMSNorms folded: notelab.lm.folded


def _decode_step(
    model: Llama,
    fused: FusedWeights | None,
    cache: nn.ModuleList,
    tok: torch.Tensor,
    pos: torch.Tensor,
    active: torch.Tensor,
    count: torch.Tensor,
    seen: torch.Tensor,
    settings: tuple[torch.Tensor, ...],
    nucleus: tuple[torch.Tensor, ...],
    out: torch.Tensor,
    out_logprob: torch.Tensor,
    how: Sampler,
    threshold: Callable[..., torch.Tensor] = filter_threshold,
    draw: Callable[..., torch.Tensor] | None = None,
    attention: Callable[..., torch.Tensor] | None = None,
    forward: Callable[..., torch.Tensor] = stacked_forward,
) -> None:
    """One token for every row, in place: ``tok`` ``(B, 1)`` at cache slots ``pos`` ``(B,)`` -> next tokens in
    ``tok`` and ``out``; active rows advance ``pos`` and ``count`` (``threshold``, ``draw``: see
    ``notelab.lm.sampling.choose_tokens``; ``attention``, ``forward``: the stacked step's, see
    :class:`StackedLayers`). Fixed
    buffers only (capturable)."""
    if fused is None:
        logits = model._forward(tok, pos, None, None, cache, 1)[:, -1]
    else:
        logits = forward(model, fused, tok, pos, cache, attention or rotated_attention)[:, -1]
    temperature, top_k, top_p, penalty, seed = settings
    decay, floor, since, ends = nucleus
    nxt, logprob = choose_tokens(
        logits, how, temperature=temperature, top_k=top_k, top_p=top_p, penalty=penalty,
        seen=seen, seed=seed, counter=count, nucleus=(decay, floor, since), threshold=threshold, draw=draw,
    )  # fmt: skip
    if how.factual:
        since.copy_(advance_sentence(since, nxt, ends))
    tok.copy_(nxt[:, None])
    out.copy_(nxt)
    if logprob is not None:
        out_logprob.copy_(logprob)
    if how.penalty:
        seen.scatter_(1, nxt[:, None], True)
    # A free row stays at slot 0; an active one never passes the last slot (its request ends there).
    pos.copy_((pos + active).clamp(max=cache[0].max_len - 1))
    count.add_(active)


class Engine:
    """Continuous batching on a static KV cache of ``max_batch`` rows (see the module docstring).

    ``add`` queues a request and returns its id; ``step`` admits queued requests into free rows (their first
    tokens come from the prefill), launches one decode step for every active row and returns the new tokens as
    :class:`TokenEvent` s: the prefills' and the previous step's (one step behind, so the device is never idle
    while Python handles events); ``cancel`` drops a request (no more events for it; its row is free at the
    next step). ``dtype``: of the cache (default: the
    autocast dtype, else the weights'). ``max_len`` defaults to the model's context. ``stacked`` (default: on
    CUDA) multiplies by stacked projection copies (``stacked_forward``); call ``refresh_weights`` after changing
    the model's weights in place. Injectable parts: ``threshold`` (how top-k / top-p find their threshold) and
    ``draw`` (how the token is taken; both ``notelab.lm.sampling.choose_tokens``), the stacked step's
    ``attention`` (:func:`stacked_forward`) and ``layers`` (:class:`StackedLayers`: ``STACKED``, or ``FOLDED``,
    the RMSNorms folded into the projections) and ``compiler`` (how the step is compiled on CUDA). Defaults: on
    CUDA with Triton, the kernels of ``notelab.lm.nucleus`` (``pivot_threshold``, ``draw_tokens``) and
    ``notelab.lm.attend.rope_attention``, and ``FOLDED`` where the model allows it; elsewhere the torch
    functions (a sort, or bisection on CUDA without Triton; ``gumbel_argmax``; ``rotated_attention``), which are
    also the reference the kernels are tested against, and ``STACKED``. ``prefill_graphs`` (default: 8 on CUDA, 0
    elsewhere): how many prompt shapes (prompts of one length admitted together, and their count) keep their
    forward captured in a CUDA graph, the least recently used dropped first: a shape's first forward runs eagerly
    and is then recorded, later ones replay it (one launch, not hundreds; ``generate`` calls with the same prompts
    repeat their shapes, a server's prompts seldom do)."""

    def __init__(
        self,
        model: Llama,
        max_batch: int = 64,
        max_len: int | None = None,
        dtype=None,  # noqa: ANN001
        *,
        stacked: bool | None = None,
        threshold: Callable[..., torch.Tensor] | None = None,
        draw: Callable[..., torch.Tensor] | None = None,
        attention: Callable[..., torch.Tensor] | None = None,
        layers: StackedLayers | None = None,
        compiler: Callable[[Callable], Callable] = compile_step,
        prefill_graphs: int | None = None,
    ) -> None:
        c = model.config
        max_len = max_len or c.max_seq_len
        if max_batch < 1 or not 2 <= max_len <= c.max_seq_len:
            raise ConfigError(
                f"Engine: expected max_batch >= 1 and 2 <= max_len <= {c.max_seq_len}, got {max_batch}, {max_len}"
            )
        w = model.embed_tokens.weight
        dev = w.device
        if dtype is None:
            dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else w.dtype
        self.model, self.max_batch, self.max_len, self.dtype, self.device = model, max_batch, max_len, dtype, dev
        cuda = dev.type == "cuda"
        why = pivot_unsupported(w) if cuda else ""  # on CUDA: the Triton kernels, unless they cannot run
        kernels = cuda and not why
        # top-p on CUDA: the pivot search (measured faster than bisection, bisection than a sort: RESULTS.md)
        self.threshold = threshold or (pivot_threshold if kernels else bisect_threshold if cuda else filter_threshold)
        self.draw = draw or (draw_tokens if kernels else gumbel_argmax)
        self.compiler = compiler
        self.vocab = c.vocab_size
        B = max_batch
        self.cache = model.make_cache(B, max_len, dtype=dtype)
        # Stacked projections (extra memory: those weights once more) where they pay: the compiled CUDA step.
        stack = (dev.type == "cuda" or attention is not None) if stacked is None else stacked
        # on CUDA the RMSNorms folded into the projections (fewer kernels a layer: measured faster, RESULTS.md)
        self.layers = layers or (FOLDED if cuda and not folded_unsupported(model) else STACKED)
        off = self.layers.unsupported(model) if stack else ""
        if off:  # e.g. copies would skip an adapter: the layers' own forward runs
            warnings.warn(f"Engine: stacked projections off ({off})", RuntimeWarning, 2)
            stack = False
        self.fused = self.layers.weights(model) if stack else None
        if attention is not None and self.fused is None:
            raise ConfigError("Engine: an injected attention is part of the stacked step, which is off here")
        if attention is None and kernels and self.fused is not None:
            why = attend_unsupported(w, c.head_dim)
            attention = None if why else rope_attention
        self.attention = attention
        long = dict(dtype=torch.long, device=dev)
        self.tok = torch.zeros(B, 1, **long)
        self.pos = torch.zeros(B, **long)
        self.active = torch.zeros(B, **long)
        self.count = torch.zeros(B, **long)
        self.seen = torch.zeros(B, self.vocab, dtype=torch.bool, device=dev)
        f32 = dict(dtype=torch.float32, device=dev)
        # per row: temperature, top_k, top_p, repetition penalty (B, 1) and the noise seed (B,)
        self.settings = (
            torch.zeros(B, 1, **f32),
            torch.full((B, 1), self.vocab, **long),
            torch.ones(B, 1, **f32),
            torch.ones(B, 1, **f32),
            torch.zeros(B, **long),
        )
        # per row, factual-nucleus sampling: decay (B, 1), floor (B, 1), sentence length (B,), sentence ends (B, V)
        self.nucleus = nucleus_rows([SamplingParams()] * B, self.vocab, dev)
        self.out = torch.zeros(B, **long)
        self.out_logprob = torch.zeros(B, **f32)
        self.rows: list[_Request | None] = [None] * B
        self.queue: deque[_Request] = deque()
        self.requests: dict[int, _Request] = {}
        self.next_id = 0
        pin = dev.type == "cuda"
        self.host = [
            (torch.zeros(B, dtype=torch.long, pin_memory=pin), torch.zeros(B, dtype=torch.float32, pin_memory=pin))
            for _ in range(2)
        ]  # two host copies of (out, out_logprob): the one being read and the one being written
        self.flip = 0
        self.pending: tuple | None = None  # the last launched step: (event, host copy, rows at launch, logprobs)
        self.steps: dict[Sampler, object] = {}  # the captured (or plain) decode step per kind of processing
        self.prefill_graphs = (PREFILL_GRAPHS if cuda else 0) if prefill_graphs is None else prefill_graphs
        if self.prefill_graphs and not cuda:
            raise ConfigError(f"Engine: prefill_graphs > 0 needs a CUDA device, got {dev.type}")
        self.prefills: OrderedDict[tuple[int, int], _Prefill] = OrderedDict()
        self.pool = torch.cuda.graph_pool_handle() if self.prefill_graphs else None  # shared: replays never overlap
        self.warned: set[str] = set()
        if why:
            self._say_once(f"Engine: Triton kernels off ({why}); the torch functions run")

    # -- requests ---------------------------------------------------------------------------------------

    def add(self, prompt: Sequence[int], params: SamplingParams) -> int:
        """Queue a request; its id. :class:`ShapeError` / :class:`ConfigError` on bad input (nothing queued)."""
        ids = check_prompt(prompt, self.vocab, self.max_len)
        check_params(params, self.vocab)
        seed = random_seed() if params.seed is None else int(params.seed)
        budget = min(params.max_new_tokens, self.max_len - len(ids))
        req = _Request(self.next_id, ids, params, seed, budget, stops=frozenset(int(t) for t in params.stop_tokens))
        self.next_id += 1
        self.requests[req.id] = req
        self.queue.append(req)
        return req.id

    def cancel(self, request_id: int) -> None:
        """Drop a queued or running request (unknown or finished ids are ignored)."""
        req = self.requests.get(request_id)
        if req is not None:
            req.cancelled = True

    def has_work(self) -> bool:
        """Whether a request is queued or running (``step`` has events to give)."""
        return any(not r.cancelled for r in self.requests.values())

    def context_limited(self, request_id: int) -> bool:
        """Whether the request's ``max_new_tokens`` did not fit in the context (it ends at ``max_len``)."""
        req = self.requests.get(request_id)
        return req is not None and req.budget < req.params.max_new_tokens

    # -- one step ---------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Admit queued requests into free rows (prefill), then one decode step for all active rows."""
        for b, req in enumerate(self.rows):
            if req is not None and req.cancelled:
                self._free(b)
        self.queue = deque(r for r in self.queue if not r.cancelled)
        for r in [r for r in self.requests.values() if r.cancelled and r.row < 0]:
            del self.requests[r.id]
        events = self._admit()
        running = [r for r in self.rows if r is not None]
        launched = self.pending[2] if self.pending is not None else [None] * len(self.rows)
        # no step when every running request gets its last token from the one in flight (a length limit)
        if all(r.made + (launched[r.row] is r) >= r.budget for r in running):
            return events + self._drain()
        how = sampler_for([r.params for r in running])
        self._run(how)
        # Read this step's tokens only at the next call: the device computes step t while the host turns step
        # t - 1 into events (a request that ended at t - 1 wastes its row's share of step t, nothing else).
        host = self.host[self.flip]
        self.flip ^= 1
        host[0].copy_(self.out, non_blocking=True)
        if how.logprobs:
            host[1].copy_(self.out_logprob, non_blocking=True)
        ready = torch.cuda.Event() if self.device.type == "cuda" else None
        if ready is not None:
            ready.record()
        events += self._drain()
        self.pending = (ready, host, list(self.rows), how.logprobs)
        return events

    def _drain(self) -> list[TokenEvent]:
        """The events of the step launched at the previous call, for the requests still in their rows."""
        if self.pending is None:
            return []
        ready, host, launched, logprobs = self.pending
        self.pending = None
        if ready is not None:
            ready.synchronize()
        toks = host[0].tolist()
        lps = host[1].tolist() if logprobs else None
        events = []
        for b, req in enumerate(launched):
            if req is not None and req.row == b:  # not ended, cancelled or replaced since the launch
                events.append(self._emit(req, toks[b], None if lps is None else lps[b]))
        return events

    def _emit(self, req: _Request, token: int, logprob: float | None) -> TokenEvent:
        """The event for ``token``, the request's next one; frees its row when it ends."""
        lp = logprob if req.params.logprobs else None
        if token in req.stops:
            self._free(req.row)
            return TokenEvent(req.id, None, None, True, "stop")
        req.made += 1
        if req.made >= req.budget:
            self._free(req.row)
            return TokenEvent(req.id, token, lp, True, "length")
        return TokenEvent(req.id, token, lp, False, None)

    def _free(self, b: int) -> None:
        req = self.rows[b]
        self.rows[b] = None
        self.active[b] = 0
        self.pos[b] = 0
        if req is not None:
            self.requests.pop(req.id, None)
            req.row = -1

    def _admit(self) -> list[TokenEvent]:
        """Prefill queued requests into free rows, one forward per prompt length; their first tokens."""
        free = [b for b, r in enumerate(self.rows) if r is None]
        taken: list[_Request] = []
        while self.queue and len(taken) < len(free):
            taken.append(self.queue.popleft())
        if not taken:
            return []
        for req, b in zip(taken, free):
            req.row = b
            self.rows[b] = req
        events: list[TokenEvent] = []
        by_len: dict[int, list[_Request]] = {}
        for req in taken:
            by_len.setdefault(len(req.prompt), []).append(req)
        for P, group in by_len.items():
            events += self._prefill(P, group)
        return events

    def _prefill(self, P: int, group: list[_Request]) -> list[TokenEvent]:
        dev, n = self.device, len(group)
        ps = [r.params for r in group]
        # Every per-row input goes to the device (a copy from pageable memory waits for the device) before the
        # prompts' forward is queued, so the first token's choice is queued behind it with no wait in between
        # (after it, ~9 such copies left the device idle ~2 ms a call at 32 rows: benchmarks/RESULTS.md).
        ints = [[r.row, min(p.top_k or self.vocab, self.vocab), r.seed, *r.prompt] for r, p in zip(group, ps)]
        ints = torch.tensor(ints, dtype=torch.long).to(dev)
        floats = [[p.temperature, top_p_value(p.top_p), p.repetition_penalty] for p in ps]
        floats = torch.tensor(floats, dtype=torch.float32).to(dev)
        decay, floor, since, ends = nucleus_rows(ps, self.vocab, dev)
        rows, tokens = ints[:, 0], ints[:, 3:].contiguous()
        settings = (floats[:, 0:1], ints[:, 1:2], floats[:, 1:2], floats[:, 2:3], ints[:, 2])
        logits = self._prompts(tokens, rows)
        for buf, val in zip(self.settings, settings):
            buf.index_copy_(0, rows, val)
        seen = torch.zeros(n, self.vocab, dtype=torch.bool, device=dev).scatter_(1, tokens, True)
        how = sampler_for(ps)
        first, logprob = choose_tokens(
            logits, how, temperature=settings[0], top_k=settings[1], top_p=settings[2], penalty=settings[3],
            seen=seen, seed=settings[4], counter=torch.zeros(n, dtype=torch.long, device=dev),
            nucleus=(decay, floor, since), threshold=self.threshold, draw=self.draw,
        )  # fmt: skip
        for buf, val in zip(self.nucleus, (decay, floor, advance_sentence(since, first, ends), ends)):
            buf.index_copy_(0, rows, val)
        self.seen.index_copy_(0, rows, seen.scatter_(1, first[:, None], True))
        self.tok.index_copy_(0, rows, first[:, None])
        self.pos.index_fill_(0, rows, P)
        self.count.index_fill_(0, rows, 1)
        self.active.index_fill_(0, rows, 1)
        toks = first.tolist()
        lps = logprob.tolist() if logprob is not None else [None] * n
        return [self._emit(r, t, lp) for r, t, lp in zip(group, toks, lps)]

    def _forward_prompts(self, tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The forward of prompts ``tokens`` ``(n, P)`` into a cache of P slots, copied into rows ``rows`` of the
        engine's cache; the last position's logits ``(n, V)`` in float32."""
        (n, P), c = tokens.shape, self.model.config
        small = nn.ModuleList(
            KVCache(n, c.n_kv_heads, P, c.head_dim, dtype=self.dtype, device=self.device) for _ in range(c.n_layers)
        )
        logits = self.model._forward(tokens, 0, None, None, small, 1)[:, -1].float()
        for big, part in zip(self.cache, small):
            big.copy_rows(rows, part)
        return logits

    def _prompts(self, tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """:meth:`_forward_prompts`, replayed from a graph where this shape was seen before (``prefill_graphs``)."""
        key = tuple(tokens.shape)
        held = self.prefills.get(key)
        if held is not None:
            self.prefills.move_to_end(key)
            held.tokens.copy_(tokens)
            held.rows.copy_(rows)
            held.graph.replay()
            return held.logits
        logits = self._forward_prompts(tokens, rows)  # eagerly (also the warm-up of what is recorded next)
        if self.prefill_graphs:
            held = _Prefill(tokens.clone(), rows.clone(), torch.cuda.CUDAGraph())
            try:
                with torch.cuda.graph(held.graph, pool=self.pool):  # recorded, not run: the cache is not written
                    held.logits = self._forward_prompts(held.tokens, held.rows)
            except Exception as e:  # noqa: BLE001 - a forward that cannot be captured still runs eagerly
                self._say_once(f"Engine: the prompt forward cannot be captured ({type(e).__name__}: {e}); eager")
                self.prefill_graphs = 0
                return logits
            self.prefills[key] = held
            while len(self.prefills) > self.prefill_graphs:
                self.prefills.popitem(last=False)
        return logits

    # -- the decode step: eager on CPU, compiled and captured on CUDA -------------------------------------

    @torch.inference_mode()
    def refresh_weights(self) -> None:
        """Copy the model's current weights into the stacked ones (in place: the captured graphs read them); in
        inference mode, as ``step`` runs, so an engine built there (``generate`` builds its own there) refreshes
        from anywhere."""
        if self.fused is not None:
            self.layers.weights(self.model, out=self.fused)

    def _buffers(self) -> tuple:
        return (self.fused, self.cache, self.tok, self.pos, self.active, self.count, self.seen, self.settings,
                self.nucleus, self.out, self.out_logprob)  # fmt: skip

    def _step_fn(self, compiled: bool) -> Callable[..., None]:
        """The step function: compiled by ``compiler`` when ``compiled``."""
        parts = dict(threshold=self.threshold, draw=self.draw, attention=self.attention, forward=self.layers.forward)
        step = partial(_decode_step, **parts)
        return self.compiler(step) if compiled else step

    def _run(self, how: Sampler) -> None:
        if self.device.type != "cuda":
            self._step_fn(False)(self.model, *self._buffers(), how)
            return
        graph = self.steps.get(how)
        if graph is None:
            graph = self.steps[how] = self._capture(how)
        graph.replay()

    def _say_once(self, message: str) -> None:
        if message not in self.warned:
            self.warned.add(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _capture(self, how: Sampler) -> torch.cuda.CUDAGraph:
        """Compile the step (inductor; on failure the eager step, said once), warm it up on a side stream and
        record it. The warm-up runs real steps, so the state it changes is put back first."""
        fn = self._step_fn(False)
        try:
            return self._record(self._step_fn(True), how)
        except Exception as e:  # noqa: BLE001 - any compiler failure: the eager step still runs
            self._say_once(f"Engine: torch.compile of the decode step failed ({type(e).__name__}: {e}); eager step")
        return self._record(fn, how)

    def _record(self, fn, how: Sampler) -> torch.cuda.CUDAGraph:  # noqa: ANN001
        state = [self.tok, self.pos, self.count, self.seen, self.nucleus[2], self.out, self.out_logprob]
        saved = [t.clone() for t in state]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        # Each kind of processing and each engine shape is one more compiled version of the same function: more
        # than dynamo's default of 8 would silently fall back to the eager step.
        with torch.cuda.stream(side), torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            for _ in range(3):
                fn(self.model, *self._buffers(), how)
                for t, s in zip(state, saved):
                    t.copy_(s)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(self.model, *self._buffers(), how)
        return graph
