"""Choosing the next token from last-position logits: pure functions on per-row tensors, no host reads.

Each row ``b`` has its own settings, applied in the order Hugging Face uses:

    repetition penalty  l_i <- l_i / r if l_i > 0 else l_i * r, for tokens already in the sequence
                        (Keskar et al. 2019, "CTRL", section 4.1)
    temperature         l <- l / tau;  tau = 0 means greedy (argmax), as in the reference Llama code
    top-k               keep the k largest logits (Fan et al. 2018)
    top-p (nucleus)     keep the smallest set of most likely tokens whose probability reaches p
                        (Holtzman et al. 2020); top-k and top-p together keep the logits >= one threshold

A sampled token is drawn with the Gumbel-max trick (Gumbel 1954; Maddison et al. 2014):

    x = argmax_i (l_i / tau + g_i),  g_i = -log(-log u_i),  u_i ~ U(0, 1)   =>   P(x = i) = softmax(l / tau)_i

The uniforms come from a counter-based hash of (row seed, token index, vocabulary index) rather than
from a stateful generator: the draw is a pure function of its arguments, so it runs inside a captured
CUDA graph, a request's tokens do not depend on the other rows of the batch, and every decode path
(the eager reference loop, the batched engine) draws the same noise and so the same tokens for a seed.
The hash is ``lowbias32`` (C. Wellons, "Hash function prospector", 2018), done in int64 with 16-bit
partial products so no step overflows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2^32`` for int64 ``x`` in ``[0, 2^32)``: two 16-bit partial products, each below 2^49."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """``lowbias32``: a bijection of ``[0, 2^32)`` whose output bits each depend on every input bit."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform_noise(seed: torch.Tensor, counter: torch.Tensor, vocab: int) -> torch.Tensor:
    """``(B, V)`` float32 uniforms in ``(0, 1)`` from row seeds ``(B,)`` and token indices ``(B,)`` (int64).

    ``u[b, i] = (hash(hash(hash(seed_b) ^ counter_b) ^ i) >> 8 + 1/2) / 2^24``: 24 random bits, exact in
    float32, never 0 or 1.
    """
    row = hash32(hash32(seed & _M32) ^ (counter & _M32))  # (B,)
    idx = torch.arange(vocab, device=seed.device, dtype=torch.int64)
    bits = hash32(row[:, None] ^ idx) >> 8
    return (bits.float() + 0.5) * 2.0**-24


@torch.library.custom_op("notelab::cumsum_last", mutates_args=())
def cumsum_last(x: torch.Tensor) -> torch.Tensor:
    """``x.cumsum(-1)`` as one opaque operator: inductor (torch 2.11) fails to generate its split scan over a
    128K vocabulary inside the compiled decode step, so the compiled step calls ATen's kernel instead."""
    return x.cumsum(dim=-1)


@cumsum_last.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@dataclass(frozen=True)
class Sampler:
    """Which parts of the processing a batch needs (Python constants, so each choice is one captured graph)."""

    sample: bool = False  # some row has temperature > 0
    filter: bool = False  # some row has top-k or top-p
    penalty: bool = False  # some row has a repetition penalty
    logprobs: bool = False  # some row wants log p(token)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor | float) -> torch.Tensor:
    """CTRL's penalty on ``logits`` ``(B, V)`` at the tokens where ``seen`` ``(B, V)`` is True; ``penalty``
    a float or ``(B, 1)``."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_threshold(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per row ``(B, 1)``, the smallest logit kept by top-k then top-p on temperature-scaled ``scaled`` ``(B, V)``.

    ``top_k`` ``(B, 1)`` int64 in ``[1, V]`` (``V``: no top-k), ``top_p`` ``(B, 1)`` float (``>= 1``: no top-p).
    Sorted descending, position ``j`` is dropped by top-p when the mass ranked above it already reaches
    ``p``; that is monotone in ``j``, so the kept set is a prefix and one threshold describes it (ties with
    the threshold are kept).
    """
    ordered = torch.sort(scaled, dim=-1, descending=True).values
    rank = torch.arange(scaled.shape[-1], device=scaled.device)
    ordered = ordered.masked_fill(rank >= top_k, float("-inf"))
    probs = ordered.softmax(dim=-1)
    drop = ((cumsum_last(probs) - probs) >= top_p) & (top_p < 1.0)
    keep = (~drop).sum(dim=-1, keepdim=True).clamp(min=1).minimum(top_k)
    return ordered.gather(-1, keep - 1)


def choose_tokens(
    logits: torch.Tensor,
    how: Sampler,
    *,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    penalty: torch.Tensor,
    seen: torch.Tensor | None,
    seed: torch.Tensor,
    counter: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The next token of each row ``(B,)`` and (``how.logprobs``) its log-probability under the unprocessed
    model distribution ``log_softmax(logits)``, from float32 ``logits`` ``(B, V)``.

    Per-row settings ``(B, 1)``: ``temperature`` (0: greedy), ``top_k`` (int64, V for none), ``top_p`` (1 for
    none), ``penalty`` (1 for none) with ``seen`` ``(B, V)`` bool; noise from ``seed`` and ``counter`` ``(B,)``
    (the row's token index). Fixed shapes and no host reads: capturable in a CUDA graph.
    """
    raw = logits
    if how.penalty and seen is not None:
        logits = apply_repetition_penalty(logits, seen, penalty)
    if how.sample:
        greedy = temperature <= 0
        scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature)
        if how.filter:
            scaled = scaled.masked_fill(scaled < filter_threshold(scaled, top_k, top_p), float("-inf"))
        gumbel = -torch.log(-torch.log(uniform_noise(seed, counter, logits.shape[-1])))
        logits = torch.where(greedy, logits, scaled + gumbel)
    token = logits.argmax(dim=-1)
    logprob = None
    if how.logprobs:
        logprob = raw.log_softmax(dim=-1).gather(-1, token[:, None])[:, 0]
    return token, logprob


def next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    counter: int = 0,
) -> torch.Tensor:
    """One token per row ``(B,)`` from last-position logits ``(B, V)`` with the same settings for every row
    (greedy when temperature is 0); row ``b`` draws with seed ``seed + b``."""
    B, V = logits.shape
    dev = logits.device

    def col(v: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.full((B, 1), v, dtype=dtype, device=dev)

    how = Sampler(sample=temperature > 0, filter=top_k is not None or top_p is not None)
    token, _ = choose_tokens(
        logits.float(),
        how,
        temperature=col(temperature),
        top_k=col(min(top_k or V, V), torch.int64),
        top_p=col(1.0 if top_p is None else top_p),
        penalty=col(1.0),
        seen=None,
        seed=seed + torch.arange(B, device=dev),
        counter=torch.full((B,), counter, dtype=torch.int64, device=dev),
    )
    return token
