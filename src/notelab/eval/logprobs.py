"""Per-token log-probabilities, predictive entropy and perplexity from a language model's logits.

For logits ``z`` over a vocabulary ``V`` at one position and a target token ``y``:

    log p(y)    = z_y - logsumexp(z)
    H(p)        = logsumexp(z) - sum_v p_v z_v          (nats; the entropy of softmax(z))
    perplexity  = exp(-(1 / N) sum_t log p(y_t))        over the N unmasked positions

Computed in float32 whatever the logits' dtype (bf16 log-probabilities lose the differences that
token-level uncertainty detectors look at; Manakul et al. 2023, "SelfCheckGPT", sec. 5 uses the mean
and max of -log p and of H per sentence). ``token_logprobs`` gathers the target's logit and subtracts
the log-normaliser, so no ``(..., V)`` log-softmax tensor is materialised beside the logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from notelab.core.errors import DataError, ShapeError


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log p(targets)`` under ``softmax(logits)``: logits ``(..., V)``, integer targets ``(...)`` -> float32."""
    if logits.ndim < 1 or tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ShapeError(
            f"token_logprobs: expected logits (..., V) and targets (...) with the same leading shape, got "
            f"{tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ShapeError(f"token_logprobs: expected integer targets, got {targets.dtype}")
    V = logits.shape[-1]
    # the range check reads the targets on the host: skipped inside a compiled graph (where it would break it)
    in_range = torch.compiler.is_compiling() or not targets.numel()
    if not in_range and (int(targets.min()) < 0 or int(targets.max()) >= V):
        raise ShapeError(
            f"token_logprobs: expected targets in [0, {V}), got ids in [{int(targets.min())}, {int(targets.max())}]"
        )
    z = logits.float()
    picked = z.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(z, dim=-1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of ``softmax(logits)`` at each position: ``(..., V)`` -> float32 ``(...)``."""
    if logits.ndim < 1 or logits.shape[-1] == 0:
        raise ShapeError(f"token_entropy: expected logits (..., V) with V >= 1, got {tuple(logits.shape)}")
    z = logits.float()
    logp = z - torch.logsumexp(z, dim=-1, keepdim=True)
    # p * logp with p = 0 (logp = -inf after masking) is 0 by the entropy's limit, not NaN
    return -torch.where(logp.isneginf(), 0.0, logp.exp() * logp).sum(-1)


def perplexity(logprobs: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """``exp(-mean log p)`` over the positions where ``mask`` is True (all when None)."""
    lp = torch.as_tensor(logprobs, dtype=torch.float64)
    if mask is not None:
        mask = torch.as_tensor(mask)
        if mask.shape != lp.shape or mask.dtype != torch.bool:
            raise ShapeError(
                f"perplexity: expected a boolean mask of shape {tuple(lp.shape)}, got {mask.dtype} {tuple(mask.shape)}"
            )
        lp = lp[mask]
    if lp.numel() == 0:
        raise DataError("perplexity: expected at least one scored token, got none")
    return math.exp(-float(lp.mean()))


# Rows are scored in groups whose float32 logits stay under this many elements (1 GiB): a 128k vocabulary
# times a few thousand tokens would otherwise hold tens of GiB at once.
MAX_LOGIT_ELEMENTS = 2**28


@torch.no_grad()
def score_sequences(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    rows: Sequence[Sequence[int]],
    vocab_size: int,
    device: torch.device | str = "cpu",
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Teacher forcing: per row of token ids ``x``, ``(log p(x_t | x_<t), H_t)`` for ``t = 1 .. len - 1`` (float32,
    on the CPU), from one forward per group of rows.

    ``logits_fn``: a causal language model, ``(B, T)`` ids on ``device`` -> ``(B, T, V)`` logits. Rows are right-padded
    (with token 0) into one batch: position ``t`` of a causal model sees tokens ``<= t`` only, so the padding
    after a row's end changes none of its logits and needs no attention mask.
    """
    rows = [[int(t) for t in r] for r in rows]
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths together: little padding
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end - start + 1) * len(rows[order[end]]) * vocab_size <= MAX_LOGIT_ELEMENTS:
            end += 1
        group = order[start:end]
        width = max(len(rows[i]) for i in group)
        if width < 2:  # nothing to score: one token has no predecessor
            for i in group:
                out[i] = (torch.zeros(0), torch.zeros(0))
            start = end
            continue
        tokens = torch.zeros(len(group), width, dtype=torch.long)
        for b, i in enumerate(group):
            tokens[b, : len(rows[i])] = torch.tensor(rows[i], dtype=torch.long)
        tokens = tokens.to(device)
        logits = logits_fn(tokens)[:, :-1]
        lp = token_logprobs(logits, tokens[:, 1:]).cpu()
        ent = token_entropy(logits).cpu()
        for b, i in enumerate(group):
            n = len(rows[i]) - 1
            out[i] = (lp[b, :n], ent[b, :n]) if n > 0 else (torch.zeros(0), torch.zeros(0))
        start = end
    return out  # type: ignore[return-value]


__all__ = ["perplexity", "score_sequences", "token_entropy", "token_logprobs"]
