"""Greedy and beam-search decoding for any encoder-decoder with the ``notelab.seq`` interface.

A model provides ``config.{bos_id, eos_id, pad_id, max_len}``, ``source_padding(src, src_pad)``,
``encode(src, src_pad) -> memory`` (a tensor or a tuple of batch-first tensors),
``init_cache(memory, src_pad, max_len) -> cache`` (with ``.reorder(index)``) and
``decode(tgt, memory, src_pad, cache=...) -> logits``: both ``Transformer`` and ``RNNSeq2Seq`` do,
so one search serves both. Without a cache every step re-decodes the whole prefix (the reference
the cached path is tested against).

Beam search ranks hypotheses Y by the length-normalised log-probability of GNMT (Wu et al. 2016,
"Google's Neural Machine Translation System", sec. 7, without the coverage penalty)::

    s(Y) = log P(Y | X) / lp(Y),        lp(Y) = ((5 + |Y|) / 6)^alpha        (|Y| counts EOS)

A hypothesis that emits EOS keeps its beam slot with its final score and competes with the live
ones at every later step; the search stops when all ``k`` slots hold finished hypotheses, after
``max_len`` tokens, or as soon as no live hypothesis can still beat the best finished one (an
exact bound, so stopping early never changes the result). With ``k = 1`` the single slot always
extends by the arg-max token, so beam search of width 1 is exactly greedy decoding.

Outputs are ``(B, T)`` token ids without BOS, EOS included where emitted, ``pad_id`` after it.
Call ``model.eval()`` first: decoding does not change the model's mode.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from notelab.core.errors import ConfigError


def gnmt_length_penalty(length: int | torch.Tensor, alpha: float) -> float | torch.Tensor:
    """GNMT's lp(Y) = ((5 + |Y|) / 6)^alpha; alpha = 0 gives plain log-probabilities."""
    return ((5.0 + length) / 6.0) ** alpha


def repeat_batch(obj: Any, k: int) -> Any:
    """Repeat every row of a batch-first tensor (or a tuple of them) ``k`` times: row b -> rows b*k .. b*k+k-1."""
    if obj is None:
        return None
    if isinstance(obj, torch.Tensor):
        return obj.repeat_interleave(k, dim=0)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(repeat_batch(o, k) for o in obj))
    return type(obj)(repeat_batch(o, k) for o in obj)


class _Stepper:
    """Next-token log-probabilities for a batch of prefixes, with or without the model's cache."""

    def __init__(self, model: nn.Module, memory: Any, src_pad: torch.Tensor, steps: int, use_cache: bool) -> None:
        self.model, self.memory, self.src_pad = model, memory, src_pad
        self.cache = model.init_cache(memory, src_pad, steps) if use_cache else None

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cache is not None:
            logits = self.model.decode(tokens[:, -1:], self.memory, self.src_pad, cache=self.cache)
        else:
            logits = self.model.decode(tokens, self.memory, self.src_pad)
        return torch.log_softmax(logits[:, -1].float(), dim=-1)

    def reorder(self, index: torch.Tensor) -> None:
        if self.cache is not None:
            self.cache.reorder(index)


def _trim(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Drop the columns after the last row's EOS (other beams may have run longer)."""
    is_eos = tokens == eos_id
    ends = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, tokens.shape[1])
    return tokens[:, : int(ends.max())]


def _prepare(
    model: nn.Module, src: torch.Tensor, src_pad: torch.Tensor | None, max_len: int | None
) -> tuple[torch.Tensor, Any, int]:
    c = model.config
    steps = c.max_len if max_len is None else max_len
    if not isinstance(steps, int) or steps < 1 or steps > c.max_len:
        raise ConfigError(f"decoding: expected max_len in [1, {c.max_len}] (the model's max_len), got {max_len!r}")
    src_pad = model.source_padding(src, src_pad)
    return src_pad, model.encode(src, src_pad), steps


@torch.no_grad()
def greedy_decode(
    model: nn.Module,
    src: torch.Tensor,
    max_len: int | None = None,
    *,
    src_pad: torch.Tensor | None = None,
    use_cache: bool = True,
    return_scores: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Arg-max decoding of ``src`` ``(B, S)`` for at most ``max_len`` tokens (default the model's max_len).

    Returns tokens ``(B, T)``; with ``return_scores`` also their summed log-probabilities ``(B,)``.
    """
    c = model.config
    src_pad, memory, steps = _prepare(model, src, src_pad, max_len)
    step = _Stepper(model, memory, src_pad, steps, use_cache)
    b = src.shape[0]
    tokens = torch.full((b, 1), c.bos_id, dtype=torch.long, device=src.device)
    finished = torch.zeros(b, dtype=torch.bool, device=src.device)
    scores = torch.zeros(b, device=src.device)
    for _ in range(steps):
        logp = step(tokens)
        nxt = logp.argmax(-1)
        scores = scores + torch.where(finished, 0.0, logp.gather(1, nxt[:, None])[:, 0])
        nxt = torch.where(finished, c.pad_id, nxt)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        finished = finished | (nxt == c.eos_id)
        if bool(finished.all()):
            break
    return (tokens[:, 1:], scores) if return_scores else tokens[:, 1:]


@torch.no_grad()
def beam_search(
    model: nn.Module,
    src: torch.Tensor,
    beam_size: int = 4,
    length_penalty: float = 0.6,
    max_len: int | None = None,
    *,
    src_pad: torch.Tensor | None = None,
    use_cache: bool = True,
    return_scores: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Beam search of width ``beam_size`` with GNMT's length penalty (module docstring); batched.

    Returns the best hypothesis per source, tokens ``(B, T)``; with ``return_scores`` also its
    score s(Y) ``(B,)``. ``length_penalty`` is alpha; 0.6 is GNMT's and the Transformer paper's value.
    """
    if not isinstance(beam_size, int) or beam_size < 1:
        raise ConfigError(f"beam_search: expected beam_size >= 1, got {beam_size!r}")
    if length_penalty < 0:
        raise ConfigError(f"beam_search: expected length_penalty (alpha) >= 0, got {length_penalty!r}")
    c = model.config
    k = beam_size
    src_pad, memory, steps = _prepare(model, src, src_pad, max_len)
    b, device = src.shape[0], src.device
    # Rows b*k .. b*k+k-1 are the beams of source b; they share the memory, so it is never reordered.
    step = _Stepper(model, repeat_batch(memory, k), repeat_batch(src_pad, k), steps, use_cache)
    tokens = torch.full((b * k, 1), c.bos_id, dtype=torch.long, device=device)
    logp_sum = torch.full((b, k), float("-inf"), device=device)
    logp_sum[:, 0] = 0.0  # one live beam at the start, so the k first picks are k different tokens
    finished = torch.zeros(b, k, dtype=torch.bool, device=device)
    score = torch.zeros(b, k, device=device)  # s(Y) of each slot at the last step
    offsets = torch.arange(b, device=device)[:, None] * k
    max_lp = gnmt_length_penalty(steps, length_penalty)
    for t in range(steps):
        logp = step(tokens).view(b, k, -1)
        vocab = logp.shape[-1]
        live = (logp_sum[..., None] + logp) / gnmt_length_penalty(t + 1, length_penalty)
        # A finished slot offers one candidate, itself extended by PAD, at its frozen score.
        done = torch.full_like(live, float("-inf"))
        done[..., c.pad_id] = score
        cand = torch.where(finished[..., None], done, live)
        score, flat = cand.view(b, k * vocab).topk(k, dim=-1)
        beam, tok = flat // vocab, flat % vocab
        was_finished = finished.gather(1, beam)
        picked = logp.view(b, k * vocab).gather(1, flat)
        logp_sum = logp_sum.gather(1, beam) + torch.where(was_finished, 0.0, picked)
        tok = torch.where(was_finished, c.pad_id, tok)
        finished = was_finished | (tok == c.eos_id)
        rows = (offsets + beam).view(-1)
        tokens = torch.cat([tokens[rows], tok.view(-1, 1)], dim=1)
        step.reorder(rows)
        # Stop once no live hypothesis can overtake the best finished one: log P only falls as Y grows
        # and lp(Y) is largest at max_len, so logP / lp(max_len) bounds a live slot's final score.
        best_done = torch.where(finished, score, float("-inf")).amax(1)
        best_live = torch.where(finished, float("-inf"), logp_sum / max_lp).amax(1)
        if bool((best_done >= best_live).all()):
            break
    # topk sorts the slots, so slot 0 holds the best hypothesis.
    best = _trim(tokens.view(b, k, -1)[:, 0, 1:], c.eos_id)
    return (best, score[:, 0]) if return_scores else best


def generate(
    model: nn.Module,
    src: torch.Tensor,
    beam_size: int = 1,
    max_len: int | None = None,
    *,
    length_penalty: float = 0.6,
    src_pad: torch.Tensor | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Greedy decoding for ``beam_size == 1``, beam search otherwise; returns tokens ``(B, T)``."""
    if beam_size == 1:
        return greedy_decode(model, src, max_len, src_pad=src_pad, use_cache=use_cache)
    return beam_search(model, src, beam_size, length_penalty, max_len, src_pad=src_pad, use_cache=use_cache)
