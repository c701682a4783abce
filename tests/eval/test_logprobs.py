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
