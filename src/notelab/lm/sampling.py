"""Choosing the next token from last-position logits: pure functions on per-row tensors, no host reads.

Each row ``b`` has its own settings, applied in the order Hugging Face uses:

    repetition penalty  l_i <- l_i / r if l_i > 0 else l_i * r, for tokens already in the sequence
                        (Keskar et al. 2019, "CTRL", section 4.1)
    temperature         l <- l / tau;  tau = 0 means greedy (argmax), as in the reference Llama code
    top-k               keep the k largest logits (Fan et al. 2018)
    top-p (nucleus)     keep the smallest set of most likely tokens whose probability reaches p
                        (Holtzman et al. 2020); top-k and top-p together keep the logits >= one threshold
    factual nucleus     top-p with p decayed within a sentence (Lee et al. 2022, "Factuality Enhanced
                        Language Models for Open-Ended Text Generation", sec. 5.1): for the t-th token
                        of a sentence p_t = max(omega, p * lambda^(t-1)), t back to 1 after a token that
                        ends a sentence (:class:`FactualNucleus`)

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

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from notelab.core.errors import ConfigError

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
    top_k: bool = False  # some row has top-k
    penalty: bool = False  # some row has a repetition penalty
    logprobs: bool = False  # some row wants log p(token)
    factual: bool = False  # some row decays its top-p within sentences (FactualNucleus)


SENTENCE_ENDS = (".", "!", "?", "\n")


@dataclass(frozen=True)
class FactualNucleus:
    """Factual-nucleus sampling (Lee et al. 2022, sec. 5.1), given as ``top_p=`` to ``notelab.lm.generate``.

    The ``t``-th token of a sentence is drawn from the nucleus of mass ``p_t = max(floor, p * decay^(t-1))``
    (the paper's ``omega`` and ``lambda``); ``t`` restarts at 1 after a token in ``sentence_end_ids``. The
    first generated token counts as the first of a sentence. ``floor = decay = p = 1`` is plain sampling.
    """

    p: float = 0.9
    decay: float = 0.9  # lambda
    floor: float = 0.3  # omega
    sentence_end_ids: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if not (0.0 < self.p <= 1.0 and 0.0 < self.decay <= 1.0 and 0.0 < self.floor <= self.p):
            raise ConfigError(
                f"FactualNucleus: expected 0 < p <= 1, 0 < decay <= 1 and 0 < floor <= p, got p={self.p}, "
                f"decay={self.decay}, floor={self.floor}"
            )
        object.__setattr__(self, "sentence_end_ids", frozenset(int(i) for i in self.sentence_end_ids))

    @classmethod
    def for_tokenizer(
        cls,
        tokenizer,  # noqa: ANN001 - anything with vocab_size and decode([id]) (notelab.data.Tokenizer)
        p: float = 0.9,
        decay: float = 0.9,
        floor: float = 0.3,
    ) -> FactualNucleus:
        """The schedule with ``sentence_end_ids``: the ids whose text, trailing spaces removed, ends in one of
        ``SENTENCE_ENDS`` ('.', '!', '?', newline)."""
        return cls(
            p, decay, floor, frozenset(sentence_end_ids(tokenizer.decode([i]) for i in range(tokenizer.vocab_size)))
        )

    def schedule(self, t: int) -> float:
        """``p_t`` for the ``t``-th token of a sentence (``t >= 1``)."""
        return max(self.floor, self.p * self.decay ** (t - 1))


def sentence_end_ids(texts: Iterable[str]) -> list[int]:
    """Indices of the token texts that end a sentence (see :meth:`FactualNucleus.for_tokenizer`)."""
    return [i for i, text in enumerate(texts) if text.rstrip(" ").endswith(SENTENCE_ENDS)]


def top_p_value(top_p: float | FactualNucleus | None) -> float:
    """The (initial) nucleus mass of a ``top_p`` setting; 1 (no filter) for None."""
    if top_p is None:
        return 1.0
    return top_p.p if isinstance(top_p, FactualNucleus) else float(top_p)


def factual_top_p(p: torch.Tensor, decay: torch.Tensor, floor: torch.Tensor, since: torch.Tensor) -> torch.Tensor:
    """``p_t = max(floor, p * decay^(t-1))`` per row ``(B, 1)``, with ``since`` ``(B,)`` = ``t - 1``, the tokens of
    the current sentence already generated (Lee et al. 2022, sec. 5.1)."""
    return torch.maximum(p * decay ** since[:, None].float(), floor)


def advance_sentence(since: torch.Tensor, token: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """``since`` ``(B,)`` after ``token`` ``(B,)``: 0 where the token ends a sentence (``ends`` ``(B, V)`` bool),
    else one more."""
    return torch.where(ends.gather(1, token[:, None])[:, 0], torch.zeros_like(since), since + 1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor | float) -> torch.Tensor:
    """CTRL's penalty on ``logits`` ``(B, V)`` at the tokens where ``seen`` ``(B, V)`` is True; ``penalty``
    a float or ``(B, 1)``."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def scale_logits(logits: torch.Tensor, temperature: torch.Tensor | None) -> torch.Tensor:
    """Float32 ``logits / temperature`` ``(B, V)``, rows with temperature <= 0 (greedy) or ``temperature`` None left as
    they are."""
    logits = logits.float()
    if temperature is None:
        return logits
    return logits / torch.where(temperature > 0, temperature, torch.ones_like(temperature))


def filter_threshold(
    logits: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    with_top_k: bool = True,
    temperature: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per row ``(B, 1)``, the smallest logit kept by top-k then top-p on the temperature-scaled logits
    (:func:`scale_logits` of ``logits`` ``(B, V)`` and ``temperature`` ``(B, 1)``; None: already scaled).

    ``top_k`` ``(B, 1)`` int64 in ``[1, V]`` (``V``: no top-k), ``top_p`` ``(B, 1)`` float (``>= 1``: no top-p).
    Sorted descending, position ``j`` is dropped by top-p when the mass ranked above it already reaches
    ``p``; that is monotone in ``j``, so the kept set is a prefix and one threshold describes it (ties with
    the threshold are kept). ``with_top_k`` (False: no row has top-k) is for :func:`bisect_threshold`.
    """
    scaled = scale_logits(logits, temperature)
    ordered = torch.sort(scaled, dim=-1, descending=True).values
    rank = torch.arange(scaled.shape[-1], device=scaled.device)
    ordered = ordered.masked_fill(rank >= top_k, float("-inf"))
    probs = ordered.softmax(dim=-1)
    drop = ((cumsum_last(probs) - probs) >= top_p) & (top_p < 1.0)
    keep = (~drop).sum(dim=-1, keepdim=True).clamp(min=1).minimum(top_k)
    return ordered.gather(-1, keep - 1)


_INF_BITS = 0x7F800000  # the int32 bits of float32 +inf: above every probability's bits
_BISECTIONS = 31  # ceil(log2(_INF_BITS)): the bracket [0, +inf bits) shrinks to adjacent integers


def bisect_threshold(
    logits: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    with_top_k: bool = True,
    temperature: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`filter_threshold` without a sort: the same kept set found by bisection.

    With ``pi = softmax(scaled)``, top-k keeps ``pi_i >= t_k``, the largest ``t_k`` with ``#{pi >= t_k} >= k``;
    top-p then keeps ``pi_i >= t_p``, the largest ``t_p >= t_k`` whose kept mass ``sum_{pi >= t_p} pi`` reaches
    ``p * Z`` (``Z``: the mass top-k kept; the sorted rule renormalises by it). Non-negative float32 values
    order as their int32 bit patterns, so 31 halvings of ``[0, bits(+inf))`` find each threshold exactly; each
    halving is one pass over ``(B, V)`` (held in L2), against a sort of every row. Sums in another order
    than a cumulative sum can move a token sitting exactly at the edge of the nucleus, nothing else.
    """
    scaled = scale_logits(logits, temperature)
    probs = scaled.softmax(dim=-1)
    bits = probs.view(torch.int32)
    B = scaled.shape[0]
    lo = torch.zeros(B, 1, dtype=torch.int32, device=scaled.device)
    if with_top_k:
        hi = torch.full_like(lo, _INF_BITS)
        for _ in range(_BISECTIONS):
            mid = lo + (hi - lo) // 2
            ok = (bits >= mid).sum(dim=-1, keepdim=True) >= top_k
            lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    t_k = lo
    target = top_p * torch.where(bits >= t_k, probs, 0.0).sum(dim=-1, keepdim=True)
    hi = torch.full_like(lo, _INF_BITS)
    for _ in range(_BISECTIONS):
        mid = lo + (hi - lo) // 2
        ok = torch.where(bits >= mid, probs, 0.0).sum(dim=-1, keepdim=True) >= target
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    t = torch.where(top_p < 1.0, lo, t_k)
    return scaled.masked_fill(bits < t, float("inf")).amin(dim=-1, keepdim=True)


def gumbel_argmax(
    logits: torch.Tensor,
    temperature: torch.Tensor | None,
    threshold: torch.Tensor | None,
    seed: torch.Tensor,
    counter: torch.Tensor,
) -> torch.Tensor:
    """The token ``(B,)`` of each row of ``logits`` ``(B, V)``: with ``temperature`` None, the argmax; else rows with
    ``temperature`` ``(B, 1)`` > 0 draw ``argmax_i (x_i + g_i)`` over ``x_i >= threshold`` (``(B, 1)``; None: every
    token), ``x`` the scaled logits (:func:`scale_logits`), Gumbel noise ``g`` from ``seed`` and ``counter`` ``(B,)``
    (:func:`uniform_noise`), and the others (greedy) take their argmax (a threshold always keeps a row's maximum,
    so it changes nothing there)."""
    if temperature is None:
        return logits.argmax(dim=-1)
    x = scale_logits(logits, temperature)
    if threshold is not None:
        x = x.masked_fill(x < threshold, float("-inf"))
    gumbel = -torch.log(-torch.log(uniform_noise(seed, counter, x.shape[-1])))
    return torch.where(temperature > 0, x + gumbel, x).argmax(dim=-1)


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
    nucleus: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    threshold: Callable[..., torch.Tensor] = filter_threshold,
    draw: Callable[..., torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The next token of each row ``(B,)`` and (``how.logprobs``) its log-probability under the unprocessed
    model distribution ``log_softmax(logits)``, from ``logits`` ``(B, V)`` (any float dtype, processed in float32).

    Per-row settings ``(B, 1)``: ``temperature`` (0: greedy), ``top_k`` (int64, V for none), ``top_p`` (1 for
    none), ``penalty`` (1 for none) with ``seen`` ``(B, V)`` bool; noise from ``seed`` and ``counter`` ``(B,)``
    (the row's token index). ``how.factual``: ``nucleus`` = (decay ``(B, 1)``, floor ``(B, 1)``, tokens of the
    sentence so far ``(B,)``) turns ``top_p`` into :func:`factual_top_p` (decay 1, floor 0 leave a row's
    ``top_p`` as it is). ``threshold``: how the top-k / top-p threshold is found (:func:`filter_threshold`,
    :func:`bisect_threshold`, ``notelab.lm.nucleus.pivot_threshold``) and ``draw`` how the token is taken
    (:func:`gumbel_argmax`, the default; ``notelab.lm.nucleus.draw_tokens``). Fixed shapes and no host reads:
    capturable in a CUDA graph.
    """
    draw = draw or gumbel_argmax
    raw = logits
    if how.factual and nucleus is not None:
        top_p = factual_top_p(top_p, *nucleus)
    if how.penalty and seen is not None:
        logits = apply_repetition_penalty(logits.float(), seen, penalty)
    if how.sample:
        thr = threshold(logits, top_k, top_p, how.top_k, temperature=temperature) if how.filter else None
        token = draw(logits, temperature, thr, seed, counter)
    else:
        token = draw(logits, None, None, seed, counter)
    logprob = None
    if how.logprobs:
        logprob = raw.float().log_softmax(dim=-1).gather(-1, token[:, None])[:, 0]
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

    how = Sampler(sample=temperature > 0, filter=top_k is not None or top_p is not None, top_k=top_k is not None)
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
