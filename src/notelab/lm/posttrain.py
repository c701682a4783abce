"""Post-training: supervised fine-tuning on responses, and Direct Preference Optimization.

SFT (Ouyang et al. 2022, sec. 3.5; Llama 3 report sec. 4.1.3): next-token cross-entropy on the
response tokens only; prompt tokens are context, not targets::

    L_SFT = -(1 / |R|) sum_{t in R} log pi(x_t | x_<t),    R = response positions of the batch

DPO (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7): for a prompt x with a
preferred response y_w and a dispreferred y_l, a trained policy pi and a frozen reference
pi_ref (the policy before DPO)::

    L_DPO = -log sigmoid( beta * [ (log pi(y_w|x) - log pi_ref(y_w|x))
                                 - (log pi(y_l|x) - log pi_ref(y_l|x)) ] )

with log pi(y|x) = sum_{t in y} log pi(y_t | x, y_<t), summed over the response tokens. The
implicit reward of a response is r(x, y) = beta (log pi(y|x) - log pi_ref(y|x)) (eq. 5); the
loss pushes the chosen reward above the rejected one.

A model here is any ``nn.Module`` mapping token ids ``(B, T)`` to logits ``(B, T, V)``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from notelab.core.errors import ConfigError, ShapeError
from notelab.data.tokenizer import Tokenizer
from notelab.eval.logprobs import token_logprobs as target_logprobs
from notelab.lm.data import (
    IGNORE_INDEX,
    PreferencePair,
    SFTExample,
    TensorDictDataset,
    preference_dataset,
    sft_dataset,
)
from notelab.train import FitResult, TrainConfig, fit


def _logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids)
    return out.logits if hasattr(out, "logits") else out


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(labels_t | x_<t), mask) for ``t >= 1``: logits at t-1 predict the label at t.

    ``logits`` ``(B, T, V)`` and ``labels`` ``(B, T)`` are aligned with the input ids (the shift
    happens here); positions whose label is ``IGNORE_INDEX`` get log-prob 0 and mask False.
    """
    if logits.shape[:2] != labels.shape:
        raise ShapeError(f"labels: expected shape {tuple(logits.shape[:2])} to match logits, got {tuple(labels.shape)}")
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    logp = target_logprobs(logits[:, :-1], labels.masked_fill(~mask, 0))
    return logp * mask, mask


def sequence_logprob(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(B,)`` log pi(y | x): the sum of the response tokens' log-probs (labels not ignored)."""
    logp, _ = token_logprobs(_logits(model, input_ids), labels)
    return logp.sum(-1)


def sft_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """L_SFT: mean cross-entropy over the response tokens of the batch (module docstring)."""
    logits = _logits(model, batch["input_ids"])
    targets = batch["labels"][:, 1:]
    n = int((targets != IGNORE_INDEX).sum())
    if n == 0:
        raise ShapeError("SFT batch: expected at least one response token, got only prompt / padding")
    loss = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )
    return loss, {"tokens": float(n)}


def dpo_loss_from_logps(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean L_DPO, chosen rewards, rejected rewards) from sequence log-probs ``(B,)`` (eq. 7).

    ``-log sigmoid(z)`` is computed as ``softplus(-z)``, exact and stable for large ``|z|``.
    """
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    loss = F.softplus(-(chosen_reward - rejected_reward)).mean()
    return loss, chosen_reward.detach(), rejected_reward.detach()


class DPOLoss:
    """``fit`` loss for DPO: holds the frozen reference model and ``beta``.

    ``DPOLoss(reference, beta)(policy, batch, generator)`` with a batch from
    :func:`notelab.lm.data.preference_dataset`. Chosen and rejected go through the model in one
    forward (concatenated on the batch axis, padded to one length).
    """

    def __init__(self, reference: nn.Module, beta: float = 0.1) -> None:
        if not beta > 0:
            raise ConfigError(f"DPO beta: expected a positive number, got {beta!r}")
        self.reference = reference
        self.beta = beta

    def __call__(
        self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        ids, labels, n = _stack_pair(batch)
        if next(self.reference.parameters()).device != ids.device:  # fit moves the policy, not the reference
            self.reference.to(ids.device)
        policy = sequence_logprob(model, ids, labels)
        with torch.no_grad():
            ref = sequence_logprob(self.reference, ids, labels)
        loss, r_w, r_l = dpo_loss_from_logps(policy[:n], policy[n:], ref[:n], ref[n:], self.beta)
        margin = r_w - r_l
        return loss, {"reward_margin": margin.mean().item(), "reward_accuracy": (margin > 0).float().mean().item()}


def _stack_pair(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    c_ids, c_lab, r_ids, r_lab = (batch[k] for k in ("chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"))
    length = max(c_ids.size(1), r_ids.size(1))

    def pad(x: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(x, (0, length - x.size(1)), value=value)

    # Padding ids are never scored (their labels are IGNORE_INDEX) and sit after every real token.
    ids = torch.cat([pad(c_ids, 0), pad(r_ids, 0)])
    labels = torch.cat([pad(c_lab, IGNORE_INDEX), pad(r_lab, IGNORE_INDEX)])
    return ids, labels, c_ids.size(0)


def frozen_copy(model: nn.Module) -> nn.Module:
    """The DPO reference: a deep copy in eval mode with no gradients."""
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


def _need(tokenizer: Tokenizer | None) -> Tokenizer:
    if tokenizer is None:
        raise ConfigError("expected a tokenizer to encode text examples, got None")
    return tokenizer


def sft(
    model: nn.Module,
    tokenizer: Tokenizer | None,
    examples: Sequence[SFTExample] | TensorDictDataset,
    train_config: TrainConfig,
    max_len: int = 256,
) -> FitResult:
    """Fine-tune ``model`` on (prompt, response) examples with the response-masked loss.

    ``tokenizer`` encodes raw examples; it may be ``None`` when ``examples`` is already a dataset.
    """
    data = examples if isinstance(examples, TensorDictDataset) else sft_dataset(_need(tokenizer), examples, max_len)
    return fit(model, sft_loss, data, train_config)


def dpo(
    model: nn.Module,
    tokenizer: Tokenizer | None,
    pairs: Sequence[PreferencePair] | TensorDictDataset,
    train_config: TrainConfig,
    beta: float = 0.1,
    max_len: int = 256,
    reference: nn.Module | None = None,
) -> FitResult:
    """DPO on preference pairs; the reference is a frozen copy of ``model`` as given (or ``reference``)."""
    data = pairs if isinstance(pairs, TensorDictDataset) else preference_dataset(_need(tokenizer), pairs, max_len)
    ref = frozen_copy(model) if reference is None else reference
    return fit(model, DPOLoss(ref, beta), data, train_config)


@dataclass
class MarginReport:
    margin: float  # mean over pairs of log pi(y_w|x) - log pi(y_l|x)
    accuracy: float  # fraction of pairs with log pi(y_w|x) > log pi(y_l|x)
    margins: list[float]


@torch.no_grad()
def preference_margins(
    model: nn.Module, data: TensorDictDataset, batch_size: int = 32, device: torch.device | str | None = None
) -> MarginReport:
    """Log-likelihood margin of chosen over rejected responses on held-out pairs."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    margins: list[float] = []
    for start in range(0, len(data), batch_size):
        batch = {k: v[start : start + batch_size].to(device) for k, v in data.tensors.items()}
        ids, labels, n = _stack_pair(batch)
        logp = sequence_logprob(model, ids, labels)
        margins.extend((logp[:n] - logp[n:]).tolist())
    model.train(was_training)
    t = torch.tensor(margins)
    return MarginReport(margin=t.mean().item(), accuracy=(t > 0).float().mean().item(), margins=margins)
