"""Every bijection: inverse(forward(x)) == x, and its ladj equals log|det J| of the autograd Jacobian."""

import math
from functools import partial

import pytest
import torch
from torch import nn

from notelab.core.errors import ConfigError, ShapeError
from notelab.flows import (
    ActNorm,
    Additive,
    Affine,
    Compose,
    Coupling,
    CouplingFlow,
    CouplingFlowConfig,
    DiagonalScaling,
    Flow,
    StandardLogistic,
    StandardNormal,
    alternating_mask,
    half_mask,
    random_permutation,
    reverse,
)
from notelab.flows.bijections import mlp

D = 5


def _randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial weights everywhere (the conditioners start at zero = identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return module.double()


def _coupling(transform, mask):
    return Coupling(mask, transform=transform, net=partial(mlp, hidden=16, depth=2))


BIJECTIONS = {
    "additive": lambda: _coupling(Additive, alternating_mask(D, 0)),
    "affine": lambda: _coupling(Affine, alternating_mask(D, 1)),
    "affine-half": lambda: _coupling(partial(Affine, clamp=1.0), half_mask(D, 1)),
    "scaling": lambda: DiagonalScaling(D),
    "actnorm": lambda: ActNorm(D),
    "reverse": lambda: reverse(D),
    "permutation": lambda: random_permutation(D, seed=3),
    "compose": lambda: Compose(
        [ActNorm(D), _coupling(Affine, alternating_mask(D, 0)), reverse(D), _coupling(Additive, half_mask(D, 0))]
    ),
}


def _jacobian_ladj(f, x):
    """log|det df/dx| per row from torch.autograd.functional.jacobian, row by row."""
    return torch.stack(
        [torch.linalg.slogdet(torch.autograd.functional.jacobian(lambda r: f(r[None])[0][0], r))[1] for r in x]
    )


@pytest.mark.parametrize("name", sorted(BIJECTIONS))
def test_round_trip_and_ladj_against_the_jacobian(name):
    f = _randomize(BIJECTIONS[name]()).eval()
    x = torch.randn(7, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y, ladj = f(x)
    assert ladj.shape == (7,)
    torch.testing.assert_close(f.inverse(y), x, atol=1e-10, rtol=0)
    torch.testing.assert_close(ladj, _jacobian_ladj(f, x), atol=1e-10, rtol=0)


def test_round_trip_float32_to_1e5():
    f = _randomize(BIJECTIONS["compose"]()).float().eval()
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(2))
    assert (f.inverse(f(x)[0]) - x).abs().max() < 1e-5


def test_nice_coupling_ladj_is_exactly_zero_and_scaling_is_the_sum_of_log_scales():
    f = _randomize(BIJECTIONS["additive"]())
    x = torch.randn(9, D, dtype=torch.float64)
    y, ladj = f(x)
    assert torch.equal(ladj, torch.zeros(9, dtype=torch.float64))
    assert not torch.allclose(y, x)  # the coupling does something
    s = _randomize(DiagonalScaling(D), seed=4)
    _, ladj = s(x)
    assert torch.equal(ladj, s.log_scale.sum().expand(9))


def test_coupling_leaves_the_masked_half_unchanged():
    mask = alternating_mask(D, 0)
    f = _randomize(_coupling(Affine, mask))
    x = torch.randn(4, D, dtype=torch.float64)
    y, _ = f(x)
    assert torch.equal(y[:, mask.bool()], x[:, mask.bool()])
    assert not torch.allclose(y[:, ~mask.bool()], x[:, ~mask.bool()])


def test_actnorm_initialises_to_zero_mean_unit_variance():
    f = ActNorm(3).train()
    x = 3 + 2 * torch.randn(256, 3, generator=torch.Generator().manual_seed(0))
    y, _ = f(x)
    torch.testing.assert_close(y.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(0), torch.ones(3), atol=1e-5, rtol=0)
    before = f.bias.detach().clone()
    f(x + 10)  # initialised once only
    assert torch.equal(f.bias, before)


def test_exact_log_likelihood_of_a_known_case():
    """A scaling flow on a Gaussian base is N(0, diag(exp(-2 s))): log_prob equals the closed form."""
    s = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64)
    scaling = DiagonalScaling(3).double()
    with torch.no_grad():
        scaling.log_scale.copy_(s)
    flow = Flow(scaling, StandardNormal(3), (3,))
    x = torch.randn(10, 3, dtype=torch.float64)
    want = torch.distributions.Normal(torch.zeros(3, dtype=torch.float64), (-s).exp()).log_prob(x).sum(1)
    torch.testing.assert_close(flow.log_prob(x), want)
    # The logistic prior is torch's Logistic(0, 1) (a sigmoid-transformed uniform).
    logistic = torch.distributions.TransformedDistribution(
        torch.distributions.Uniform(0.0, 1.0), [torch.distributions.SigmoidTransform().inv]
    )
    z = torch.randn(50, 3, dtype=torch.float64)
    torch.testing.assert_close(
        StandardLogistic(3).log_prob(z), logistic.log_prob(z.float()).sum(1).double(), atol=1e-5, rtol=0
    )


def test_samples_and_rsample_log_prob_agree():
    flow = _randomize(CouplingFlow(CouplingFlowConfig.from_name("realnvp", sample_shape=(2, 2), hidden=8))).eval()
    g = torch.Generator().manual_seed(0)
    x, log_p = flow.rsample_and_log_prob(16, generator=g)
    assert x.shape == (16, 2, 2)
    torch.testing.assert_close(log_p, flow.log_prob(x))
    assert flow.sample(3).shape == (3, 2, 2)


def test_logistic_prior_sample_moments():
    z = StandardLogistic(2).sample(200_000, generator=torch.Generator().manual_seed(0))
    assert abs(float(z.mean())) < 0.02
    assert abs(float(z.var()) - math.pi**2 / 3) < 0.05


def test_bad_input_is_one_clear_error():
    flow = CouplingFlow(CouplingFlowConfig(sample_shape=(2,), hidden=8))
    with pytest.raises(ShapeError, match=r"expected x of shape \(B, 2\), got \(4, 3\)"):
        flow.log_prob(torch.zeros(4, 3))
    with pytest.raises(ShapeError, match="finite"):
        flow.log_prob(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ConfigError, match="n >= 1"):
        flow.sample(0)
    with pytest.raises(ConfigError, match="unknown transform"):
        CouplingFlowConfig(transform="spline")
    with pytest.raises(ConfigError, match="2 or more"):
        CouplingFlowConfig(sample_shape=(1,))
    with pytest.raises(ConfigError, match="mask"):
        Coupling(torch.ones(3))


def test_save_and_load(tmp_path):
    flow = _randomize(CouplingFlow(CouplingFlowConfig.from_name("realnvp", hidden=8))).float().eval()
    flow.save_pretrained(tmp_path)
    again = CouplingFlow.from_pretrained(tmp_path).eval()
    x = torch.randn(5, 2)
    torch.testing.assert_close(again.log_prob(x), flow.log_prob(x))


@pytest.mark.parametrize("name", ["nice", "realnvp"])
def test_num_parameters_formula(name):
    config = CouplingFlowConfig.from_name(name, sample_shape=(1, 4, 4), hidden=12, depth=2)
    assert CouplingFlow.num_parameters(config) == sum(p.numel() for p in CouplingFlow(config).parameters())


def test_actnorm_does_not_blow_up_a_coordinate_constant_in_its_first_batch():
    f = ActNorm(3).train()
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    x[:, 2] = -1.0  # a blank pixel in every image of the batch
    f(x)
    assert float(f.log_scale[2].detach()) <= float(-torch.log(0.1 * x.std(0).mean())) + 1e-5
    assert float(f.log_scale[2].detach()) < 3
