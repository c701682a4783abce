"""Autoregressive generation: ``generate`` / ``stream`` pick the fastest correct decode path themselves.

Each step picks ``x_{t+1} ~ p(. | x_{<=t})`` from the logits of the last position, processed as
``notelab.lm.sampling`` describes (repetition penalty, temperature, top-k, top-p; greedy at temperature 0).
The prompt is run once (prefill), then one token per step reads the KV cache. Three paths:

    "reference"  the eager loop on a dynamic cache: prompts left-padded into one batch (an attention mask
                 hides the padding, each row's positions start at 0 at its first real token). The CPU path.
    "engine"     ``notelab.lm.engine.Engine``: one cache row per prompt, each at its own position, a static
                 decode step compiled and captured in a CUDA graph, sampling inside the graph. On CUDA, for
                 sampled decoding and batches.
    "chain"      ``notelab.lm.chain``: the batch-1 step as one chain of Triton kernels in a CUDA graph, with
                 the sampling after it in the same graph. On CUDA, for one prompt, on the models it covers.

``path="auto"`` chooses by that table (measured fastest on an H200, benchmarks/RESULTS.md); a path that
cannot run says why once and the next one runs. Every path gives the reference's tokens in float32
(greedy), and the same sampled tokens for a seed: the noise is a pure function of (row seed, token index).

Every row gets ``max_new_tokens`` new tokens unless a stop token ends it or the context (``max_seq_len``)
is full for that row (its own prompt length counts, not the batch's longest); the latter is reported by a
:class:`ContextLimitWarning`.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from notelab.core.attention import KVCache
from notelab.core.errors import ConfigError, ShapeError, unknown_name
from notelab.lm.chain import ChainDecoder, chain_unsupported
from notelab.lm.engine import (
    Engine,
    SamplingParams,
    check_params,
    check_prompt,
    nucleus_rows,
    random_seed,
    sampler_for,
)
from notelab.lm.model import Llama
from notelab.lm.sampling import FactualNucleus, advance_sentence, choose_tokens, next_token, top_p_value

__all__ = ["PATHS", "ContextLimitWarning", "generate", "left_pad", "next_token", "stream"]

Prompts = Sequence[Sequence[int]] | torch.Tensor
PATHS = ("auto", "reference", "engine", "chain")
log = logging.getLogger(__name__)


class ContextLimitWarning(UserWarning):
    """A row got fewer than ``max_new_tokens`` new tokens because the model's context was full."""


def left_pad(
    prompts: Prompts, pad_id: int = 0, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> ``tokens (B, P)`` left-padded with ``pad_id`` and ``mask (B, P)`` (True at real tokens)."""
    rows = _rows(prompts)
    width = max(len(r) for r in rows)
    tokens = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows], device=device)
    return tokens, mask


def _rows(prompts: Prompts) -> list[list[int]]:
    """Prompts as lists of ids: a ``(B, P)`` / ``(P,)`` tensor is taken as unpadded."""
    if isinstance(prompts, torch.Tensor):
        t = prompts[None] if prompts.ndim == 1 else prompts
        if t.ndim != 2 or t.shape[1] == 0 or t.dtype.is_floating_point:
            raise ShapeError(f"generate: expected integer prompts (B, P) with P >= 1, got {tuple(prompts.shape)}")
        return t.tolist()
    rows = [[int(i) for i in p] for p in prompts]
    if not rows or min(len(r) for r in rows) == 0:
        raise ShapeError("generate: expected at least one non-empty prompt, got an empty one")
    return rows


# Per model, the engine / chain state of its last call of each kind: capturing CUDA graphs and compiling take
# far longer than a short generation, so a second call of the same shape reuses them (freed with the model).
_HELD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _held(
    model: Llama, kind: str, key: tuple, build: Callable[[], object], fits: Callable[[object], bool] | None = None
) -> object:
    """The ``kind`` of decoder held for ``model`` under ``key`` (built by ``build`` when there is none, the key
    changed, or ``fits(held)`` is False)."""
    w = model.embed_tokens.weight
    # A graph replays fixed addresses: a moved model, or one whose parameters were replaced (not updated in place),
    # needs new ones. The addresses of every parameter and buffer, read at each call (~150 tensors: a fraction of
    # a millisecond).
    addresses = tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))
    key = (*key, w.device, w.dtype, addresses)
    per_model = _HELD.setdefault(model, {})
    held = per_model.get(kind)
    if held is None or held[0] != key or (fits is not None and not fits(held[1])):
        per_model.pop(kind, None)  # free the old buffers before allocating new ones
        held = per_model[kind] = (key, build())
    return held[1]


def _chain_unsupported(model: Llama, rows: list[list[int]], params: SamplingParams) -> str:
    """Why the chain cannot decode these prompts with these settings ("" when it can)."""
    if isinstance(params.top_p, FactualNucleus) and params.temperature > 0:
        return "factual-nucleus sampling keeps a per-sentence state the chain's sampler does not carry"
    return chain_unsupported(model, len(rows), False, model.embed_tokens.weight.dtype)


def _choose_path(model: Llama, path: str, rows: list[list[int]], params: SamplingParams) -> str:
    """The path to run (see the module docstring), saying once why a requested one cannot."""
    cuda = model.embed_tokens.weight.is_cuda
    if path == "auto":
        if not cuda:
            return "reference"
        if len(rows) == 1 and not _chain_unsupported(model, rows, params):
            return "chain"
        return "engine"
    if path == "chain":
        why = _chain_unsupported(model, rows, params)
        if why:
            warnings.warn(f"generate: the chain path cannot run ({why}); the engine runs", RuntimeWarning, 3)
            return "engine"
    return path


@torch.inference_mode()
def stream(
    model: Llama,
    prompts: Prompts,
    max_new_tokens: int = 64,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | FactualNucleus | None = None,
    repetition_penalty: float = 1.0,
    stop_tokens: Sequence[int] = (),
    seed: int | torch.Generator | None = None,
    pad_id: int = 0,
    path: str = "auto",
) -> Iterator[list[int | None]]:
    """Yield, step by step, the new token of every row (``None`` for rows already ended).

    ``prompts``: lists of token ids, or a ``(B, P)`` / ``(P,)`` tensor taken as unpadded. A row ends after
    one of ``stop_tokens`` (not yielded), after ``max_new_tokens``, or when the context is full.
    ``seed``: an int, or a generator to draw one from (default: torch's); row ``b`` samples with seed
    ``seed + b``. ``pad_id`` fills the left padding of the reference path (it never changes the tokens).
    ``path``: one of ``PATHS`` (``"auto"``: the fastest that runs; see the module docstring).
    ``top_p``: a mass in (0, 1], or a :class:`notelab.lm.sampling.FactualNucleus` (top-p decayed within each
    sentence; the reference and engine paths apply it, so ``"auto"`` does not pick the chain for it).
    """
    if path not in PATHS:
        raise unknown_name("path", path, PATHS)
    rows = _rows(prompts)
    c = model.config
    params = SamplingParams(max_new_tokens, temperature, top_k, top_p, repetition_penalty, tuple(stop_tokens))
    check_params(params, c.vocab_size)
    for r in rows:
        check_prompt(r, c.vocab_size, c.max_seq_len)
    budgets = [min(max_new_tokens, c.max_seq_len - len(r)) for r in rows]
    if min(budgets) < max_new_tokens:
        short = [b for b, n in enumerate(budgets) if n < max_new_tokens]
        warnings.warn(
            f"generate: rows {short} stop at the context limit ({c.max_seq_len} tokens) before "
            f"{max_new_tokens} new tokens ({min(budgets)} for the longest prompt)",
            ContextLimitWarning,
            stacklevel=3,
        )
    if isinstance(seed, torch.Generator):
        seed = int(torch.randint(0, 2**31 - 1, (), generator=seed, device=seed.device))
    base = random_seed() if seed is None else int(seed)
    how = _choose_path(model, path, rows, params)
    log.debug("generate: %s path for %d prompt(s)", how, len(rows))
    if how == "chain":
        yield from _stream_chain(model, rows[0], budgets[0], params, base)
    elif how == "engine":
        yield from _stream_engine(model, rows, budgets, params, base)
    else:
        yield from _stream_reference(model, rows, budgets, params, base, pad_id)


def _ended(row_tokens: list[int | None], done: list[bool], stops: set[int]) -> list[int | None]:
    """``row_tokens`` with rows that ended (now or before, by a stop token) as None; updates ``done``."""
    out: list[int | None] = []
    for b, t in enumerate(row_tokens):
        done[b] = done[b] or t is None or t in stops
        out.append(None if done[b] else t)
    return out


def _stream_reference(
    model: Llama, rows: list[list[int]], budgets: list[int], p: SamplingParams, base: int, pad_id: int
) -> Iterator[list[int | None]]:
    """The eager loop on a dynamic cache wide enough for every row's own budget (see the module docstring)."""
    c, w = model.config, model.embed_tokens.weight
    dev = w.device
    tokens, prompt_mask = left_pad(rows, pad_id, dev)
    B, P = tokens.shape
    steps = max(budgets)
    padded = not bool(prompt_mask.all())
    dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else w.dtype
    # A short row of a padded batch may run past slot max_seq_len of the batch's cache (not of its positions).
    cache = nn.ModuleList(
        KVCache(B, c.n_kv_heads, P + steps, c.head_dim, dtype=dtype, device=dev) for _ in range(c.n_layers)
    )
    mask = torch.ones(B, P + steps, dtype=torch.bool, device=dev)
    mask[:, :P] = prompt_mask
    n_pad = (~prompt_mask).sum(dim=1, keepdim=True)
    positions = (prompt_mask.long().cumsum(1) - 1).clamp(min=0) if padded else None
    logits = model._forward(tokens, 0, positions, mask[:, :P] if padded else None, cache, 1)[:, -1].float()

    def col(v: float, dt: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.full((B, 1), v, dtype=dt, device=dev)

    settings = dict(
        temperature=col(p.temperature),
        top_k=col(min(p.top_k or c.vocab_size, c.vocab_size), torch.long),
        top_p=col(top_p_value(p.top_p)),
        penalty=col(p.repetition_penalty),
        seed=base + torch.arange(B, device=dev),
    )
    how = sampler_for([p])
    decay, floor, since, ends = nucleus_rows([p] * B, c.vocab_size, dev)
    seen = torch.zeros(B, c.vocab_size, dtype=torch.bool, device=dev).scatter_(1, tokens, prompt_mask)
    stops = {int(t) for t in p.stop_tokens}
    done = [False] * B
    for i in range(steps):
        counter = torch.full((B,), i, dtype=torch.long, device=dev)
        tok, _ = choose_tokens(logits, how, seen=seen, counter=counter, nucleus=(decay, floor, since), **settings)
        since = advance_sentence(since, tok, ends)
        seen.scatter_(1, tok[:, None], True)
        host = tok.tolist()
        yield _ended([t if i < budgets[b] else None for b, t in enumerate(host)], done, stops)
        if all(done) or i == steps - 1:
            return
        s = P + i
        # rows past their own budget keep running (ignored); their positions stay in the embedding's range
        pos = (s - n_pad).clamp(max=c.max_seq_len - 1) if padded else None
        logits = model._forward(tok[:, None], s, pos, mask[:, : s + 1] if padded else None, cache, 1)[:, -1].float()


def _stream_engine(
    model: Llama, rows: list[list[int]], budgets: list[int], p: SamplingParams, base: int
) -> Iterator[list[int | None]]:
    """The rows as requests of an engine with one cache row each; yields their i-th tokens together."""
    c, w = model.config, model.embed_tokens.weight
    dtype = torch.get_autocast_dtype(w.device.type) if torch.is_autocast_enabled(w.device.type) else w.dtype
    max_len = min(c.max_seq_len, max(len(r) + n for r, n in zip(rows, budgets)))
    # An engine with a longer cache serves shorter calls too (same tokens: a row reads its own slots only), so
    # a call with fewer new tokens than the last does not compile and capture another step.
    engine: Engine = _held(
        model,
        "engine",
        (len(rows), dtype),
        lambda: Engine(model, len(rows), max_len, dtype),
        fits=lambda e: e.max_len >= max_len,
    )
    for rid in list(engine.requests):  # an earlier stream left unfinished
        engine.cancel(rid)
    engine.refresh_weights()  # the model may have changed in place since the last call
    ids = {}
    for b, r in enumerate(rows):
        rid = engine.add(r, SamplingParams(**{**p.__dict__, "seed": base + b}))
        ids[rid] = b
    got: list[list[int]] = [[] for _ in rows]
    ended = [False] * len(rows)
    i = 0
    while True:
        while all(ended[b] or len(got[b]) > i for b in range(len(rows))):
            if all(ended[b] and len(got[b]) <= i for b in range(len(rows))):
                return
            yield [got[b][i] if len(got[b]) > i else None for b in range(len(rows))]
            i += 1
        for e in engine.step():
            b = ids[e.request_id]
            if e.token is not None:
                got[b].append(e.token)
            ended[b] = ended[b] or e.finished


def _stream_chain(
    model: Llama, prompt: list[int], steps: int, p: SamplingParams, seed: int
) -> Iterator[list[int | None]]:
    """One prompt through the chain (after a stop token, at most two chunks of steps are wasted)."""
    total = len(prompt) + steps
    dec: ChainDecoder = _held(model, "chain", (total,), lambda: ChainDecoder(model, total))
    tokens = torch.tensor([prompt], dtype=torch.long, device=model.embed_tokens.weight.device)
    how = sampler_for([p])
    top_k = min(p.top_k or model.config.vocab_size, model.config.vocab_size)
    settings = (p.temperature, top_k, top_p_value(p.top_p), p.repetition_penalty, seed)
    done = [False]
    stops = {int(t) for t in p.stop_tokens}
    for chunk in dec.run(tokens, steps, how, settings):
        for t in chunk:
            out = _ended([t], done, stops)
            if done[0]:
                return
            yield out


def generate(
    model: Llama,
    prompts: Prompts,
    max_new_tokens: int = 64,
    *,
    callback: Callable[[int, int], None] | None = None,
    **kwargs,
) -> list[list[int]]:
    """New tokens for each prompt (stop tokens not included); ``callback(row, token)`` streams them.

    ``kwargs`` are those of :func:`stream` (temperature, top_k, top_p, repetition_penalty, stop_tokens,
    seed, pad_id, path).
    """
    unknown = set(kwargs) - {
        "temperature",
        "top_k",
        "top_p",
        "repetition_penalty",
        "stop_tokens",
        "seed",
        "pad_id",
        "path",
    }
    if unknown:
        raise ConfigError(f"generate: unknown options {sorted(unknown)}; expected those of notelab.lm.stream")
    n = 1 if isinstance(prompts, torch.Tensor) and prompts.ndim == 1 else len(prompts)
    out: list[list[int]] = [[] for _ in range(n)]
    # eval() and train() each set a flag on every module (~2 ms for a Llama's ~400, measured on the H200 host: 1%
    # of a 256-token call at 32 rows): only when some module is in training mode.
    was_training = model.training
    switch = any(m.training for m in model.modules())
    if switch:
        model.eval()
    try:
        for step in stream(model, prompts, max_new_tokens, **kwargs):
            for row, tok in enumerate(step):
                if tok is not None:
                    out[row].append(tok)
                    if callback is not None:
                        callback(row, tok)
    finally:
        if switch:
            model.train(was_training)
    return out
