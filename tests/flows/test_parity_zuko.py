"""Coupling flows against zuko (the reference implementation of the bijection interface): the same
conditioner networks inside zuko's CouplingTransform give the same samples' log-densities."""

import math

import pytest
import torch

from notelab.flows import Coupling, CouplingFlow, CouplingFlowConfig

zuko = pytest.importorskip("zuko")
from zuko.transforms import (  # noqa: E402
    AdditiveTransform,
    ComposedTransform,
    CouplingTransform,
    DependentTransform,
    MonotonicAffineTransform,
)

SLOPE = 1e-3  # zuko's minimum slope: its scale a maps to log-scale a / (1 + |a / log(slope)|)


def _zuko_scale(s):
    """The unconstrained zuko scale whose log-scale is s (inverting zuko's soft bound)."""
    bound = abs(math.log(SLOPE))
    return s / (1 - s.abs() / bound)


def _zuko_coupling(layer: Coupling) -> CouplingTransform:
    mask = layer.mask.bool()
    idx_a, idx_b = mask.nonzero().squeeze(-1), (~mask).nonzero().squeeze(-1)

    def meta(x_a):
        full = x_a.new_zeros(*x_a.shape[:-1], len(mask))
        full[..., idx_a] = x_a
        params = layer.net(full).view(*x_a.shape[:-1], len(mask), -1)[..., idx_b, :]
        if params.shape[-1] == 1:
            return DependentTransform(AdditiveTransform(params[..., 0]), 1)
        s = layer.transform.clamp * torch.tanh(params[..., 0] / layer.transform.clamp)
        return DependentTransform(MonotonicAffineTransform(params[..., 1], _zuko_scale(s), slope=SLOPE), 1)

    return CouplingTransform(meta, mask)


@pytest.mark.parametrize("preset", ["nice", "realnvp"])
def test_log_prob_equals_zukos_normalizing_flow(preset):
    torch.manual_seed(0)
    config = CouplingFlowConfig.from_name(preset, sample_shape=(4,), hidden=16, depth=2, scaling=False, norm="none")
    ours = CouplingFlow(config).double()
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    layers = list(ours.bijection.bijections)
    transform = ComposedTransform(*[_zuko_coupling(layer) for layer in layers])
    zero, one = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    if config.prior == "gaussian":
        base = torch.distributions.Independent(torch.distributions.Normal(zero, one), 1)
    else:
        uniform = torch.distributions.Uniform(zero, one)
        logistic = torch.distributions.TransformedDistribution(uniform, [torch.distributions.SigmoidTransform().inv])
        base = torch.distributions.Independent(logistic, 1)
    theirs = zuko.distributions.NormalizingFlow(transform, base)
    x = torch.randn(32, 4, dtype=torch.float64)
    torch.testing.assert_close(ours.log_prob(x), theirs.log_prob(x), atol=1e-8, rtol=1e-8)
    z, _ = ours.bijection(x)
    torch.testing.assert_close(transform(x), z, atol=1e-10, rtol=0)
    torch.testing.assert_close(transform.inv(z), ours.bijection.inverse(z), atol=1e-10, rtol=0)
