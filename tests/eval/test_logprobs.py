import math

import pytest
import torch

from notelab.core.errors import DataError, ShapeError
from notelab.eval.logprobs import perplexity, token_entropy, token_logprobs


def test_logprobs_equal_log_softmax_gather_in_float32():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g) * 4
    targets = torch.randint(0, 11, (2, 5), generator=g)
    expected = torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None])[..., 0]
    got = token_logprobs(logits.bfloat16(), targets)
    assert got.dtype == torch.float32 and got.shape == (2, 5)
    torch.testing.assert_close(token_logprobs(logits, targets).double(), expected, atol=1e-5, rtol=0)
    # from bf16 logits: the bf16 rounding of the logits only, no bf16 arithmetic after it
    ref = torch.log_softmax(logits.bfloat16().double(), -1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=0)


def test_entropy_known_values():
    V = 8
    assert token_entropy(torch.zeros(V)).item() == pytest.approx(math.log(V), abs=1e-6)  # uniform
    assert token_entropy(torch.tensor([0.0, -float("inf"), -float("inf")])).item() == 0.0  # one-hot, no NaN
    z = torch.randn(3, 4, V)
    p = torch.softmax(z.double(), -1)
    torch.testing.assert_close(token_entropy(z).double(), -(p * p.log()).sum(-1), atol=1e-5, rtol=0)


def test_perplexity_masked_and_uniform():
    assert perplexity(torch.full((4,), -math.log(7))) == pytest.approx(7.0)
    lp = torch.tensor([[-1.0, -2.0], [-3.0, -100.0]])
    mask = torch.tensor([[True, True], [True, False]])
    assert perplexity(lp, mask) == pytest.approx(math.exp(2.0))


def test_bad_input():
    with pytest.raises(ShapeError, match="same leading shape"):
        token_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ShapeError, match=r"targets in \[0, 5\)"):
        token_logprobs(torch.zeros(2, 5), torch.tensor([0, 5]))
    with pytest.raises(ShapeError, match="integer targets"):
        token_logprobs(torch.zeros(2, 5), torch.zeros(2))
    with pytest.raises(DataError, match="at least one"):
        perplexity(torch.zeros(2), torch.tensor([False, False]))
    with pytest.raises(ShapeError, match="boolean mask"):
        perplexity(torch.zeros(2), torch.tensor([1, 0]))


@pytest.mark.parametrize("budget", [2**28, 40])  # one forward for all rows; or one per row (40 < 2 x 7 x 13)
def test_score_sequences_equals_one_row_at_a_time_and_keeps_order(budget, monkeypatch):
    import notelab.eval.logprobs as module
    from notelab.eval.logprobs import score_sequences

    monkeypatch.setattr(module, "MAX_LOGIT_ELEMENTS", budget)

    torch.manual_seed(0)
    V = 13
    emb, mix = torch.randn(V, 8), torch.randn(8, V)

    def causal(tokens):  # a causal toy LM: position t's logits depend on tokens <= t (running mean)
        h = emb[tokens].cumsum(1) / torch.arange(1, tokens.shape[1] + 1)[:, None]
        return h @ mix

    rows = [[1, 2, 3, 4, 5], [7], [3, 3], [0, 12, 5, 6, 1, 2, 9]]
    got = score_sequences(causal, rows, V)
    for r, (lp, ent) in zip(rows, got):
        assert lp.shape == ent.shape == (len(r) - 1,)
        if len(r) > 1:
            logits = causal(torch.tensor([r]))[0, :-1]
            torch.testing.assert_close(lp, token_logprobs(logits, torch.tensor(r[1:])), atol=1e-6, rtol=0)
            torch.testing.assert_close(ent, token_entropy(logits), atol=1e-6, rtol=0)
