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
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= V):
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


__all__ = ["perplexity", "token_entropy", "token_logprobs"]
