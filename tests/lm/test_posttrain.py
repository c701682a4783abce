import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from notelab.core.errors import ConfigError
from notelab.lm.data import IGNORE_INDEX, TensorDictDataset
from notelab.lm.posttrain import (
    DPOLoss,
    dpo,
    dpo_loss_from_logps,
    frozen_copy,
    preference_margins,
    sequence_logprob,
    sft_loss,
)
from notelab.train import TrainConfig


class TinyLM(nn.Module):
    """A causal stand-in: logits at t depend on tokens <= t only (embedding + running mean)."""

    def __init__(self, vocab: int = 11, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids).cumsum(1) / torch.arange(1, ids.size(1) + 1)[None, :, None]
        return self.head(h)


def test_dpo_loss_matches_hand_formula():
    pw, pl = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    rw, rl = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -2.5])
    beta = 0.5
    loss, cr, rr = dpo_loss_from_logps(pw, pl, rw, rl, beta)
    # pair 0: 0.5 * ((-3 + 3.5) - (-4 + 3)) = 0.75; pair 1: 0.5 * ((-5 + 4) - (-2 + 2.5)) = -0.75
    z = [0.75, -0.75]
    expected = sum(-math.log(1 / (1 + math.exp(-v))) for v in z) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert torch.allclose(cr - rr, torch.tensor(z))


def test_sft_loss_is_ce_over_response_tokens_only():
    torch.manual_seed(0)
    model = TinyLM()
    ids = torch.randint(0, 11, (2, 7))
    labels = ids.clone()
    labels[0, :3] = IGNORE_INDEX  # prompt of 3 tokens
    labels[1, :5] = IGNORE_INDEX
    labels[1, 6:] = IGNORE_INDEX  # padding
    loss, metrics = sft_loss(model, {"input_ids": ids, "labels": labels})
    logits = model(ids)
    terms = [F.cross_entropy(logits[b, t - 1], ids[b, t]) for b, t in [(0, 3), (0, 4), (0, 5), (0, 6), (1, 5)]]
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-6)
    assert metrics["tokens"] == 5
    # Changing a prompt token's target changes nothing (it is never a target; it is still context).
    ids2 = ids.clone()
    ids2[1, 4] = (ids[1, 4] + 1) % 11
    loss_a, _ = sft_loss(model, {"input_ids": ids2, "labels": labels})
    assert not torch.isclose(loss_a, loss)  # context matters...
    labels_b = labels.clone()
    labels_b[0, 1] = IGNORE_INDEX
    loss_b, _ = sft_loss(model, {"input_ids": ids, "labels": labels_b})
    assert torch.equal(loss_b, loss)  # ...but prompt labels never do


def test_sequence_logprob_sums_response_tokens():
    torch.manual_seed(0)
    model = TinyLM()
    ids = torch.randint(0, 11, (1, 5))
    labels = ids.clone()
    labels[0, :2] = IGNORE_INDEX
    logp = F.log_softmax(model(ids), -1)
    expected = sum(logp[0, t - 1, ids[0, t]] for t in (2, 3, 4))
    assert sequence_logprob(model, ids, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def _pairs(n: int = 16) -> TensorDictDataset:
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 11, (n, 3), generator=g)
    chosen = torch.cat([prompt, torch.full((n, 2), 7)], 1)
    rejected = torch.cat([prompt, torch.full((n, 2), 4)], 1)
    lab_c, lab_r = chosen.clone(), rejected.clone()
    lab_c[:, :3] = IGNORE_INDEX
    lab_r[:, :3] = IGNORE_INDEX
    return TensorDictDataset(
        {"chosen_ids": chosen, "chosen_labels": lab_c, "rejected_ids": rejected, "rejected_labels": lab_r}
    )


def test_dpo_loss_at_init_is_log2_and_training_moves_margin():
    torch.manual_seed(0)
    model = TinyLM()
    data = _pairs()
    batch = data.tensors
    loss, metrics = DPOLoss(frozen_copy(model), beta=0.1)(model, batch)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)  # policy == reference
    before = preference_margins(model, data)
    cfg = TrainConfig(steps=30, batch_size=8, lr=5e-2, progress=False, device="cpu", log_every=10)
    result = dpo(model, None, data, cfg, beta=0.5)
    after = preference_margins(result.model, data)
    assert after.margin > before.margin + 1.0
    assert after.accuracy == 1.0
    assert result.history[-1]["reward_margin"] > 0


def test_reference_is_frozen_and_beta_checked():
    ref = frozen_copy(TinyLM())
    assert not any(p.requires_grad for p in ref.parameters()) and not ref.training
    with pytest.raises(ConfigError, match="beta"):
        DPOLoss(ref, beta=0.0)
