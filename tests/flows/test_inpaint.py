"""Inpainting by gradient ascent on log p keeps the observed pixels and finds the conditional mode of a Gaussian."""

import pytest
import torch

from notelab.core.errors import ConfigError
from notelab.flows.inpaint import inpaint


def test_inpainting_a_correlated_gaussian_reaches_the_conditional_mean():
    # p = N(0, S) with S = [[1, r], [r, 1]]: the mode of x2 given x1 is r * x1.
    r = 0.8
    cov = torch.tensor([[1.0, r], [r, 1.0]])
    dist = torch.distributions.MultivariateNormal(torch.zeros(2), cov)
    x = torch.tensor([[0.5, 0.0], [-0.7, 0.9]])
    known = torch.tensor([1.0, 0.0])
    filled = inpaint(dist.log_prob, x, known, steps=400, lr=0.05)
    assert torch.equal(filled[:, 0], x[:, 0])
    torch.testing.assert_close(filled[:, 1], r * x[:, 0], atol=2e-3, rtol=0)
    assert (dist.log_prob(filled) >= dist.log_prob(x * known)).all()


def test_bad_arguments():
    with pytest.raises(ConfigError):
        inpaint(lambda x: x.sum(1), torch.zeros(1, 2), torch.ones(2), steps=0)
