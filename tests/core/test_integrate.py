"""notelab.core.integrate: convergence orders, adaptive parity with torchdiffeq, divergence
estimators, and DDIM (eta = 0) as Euler on the probability-flow ODE."""

from __future__ import annotations

import math

import pytest
import torch
import torchdiffeq

from notelab.core.errors import ConfigError, ShapeError
from notelab.core.integrate import NFECounter, counted, divergence, euler, heun, integrate, odeint, rk4
from notelab.diffusion import NoiseSchedule, ddim_timesteps, sample_ddim


def field(x: torch.Tensor, t: float) -> torch.Tensor:
    # dx/dt = -2 x + t, x(t) = (x0 + 1/4) e^{-2t} + t / 2 - 1/4
    return -2 * x + t


def exact(x0: torch.Tensor, t: float) -> torch.Tensor:
    return (x0 + 0.25) * math.exp(-2 * t) + t / 2 - 0.25


X0 = torch.tensor([[1.0], [-0.5]], dtype=torch.float64)


@pytest.mark.parametrize("stepper, order, nfe_per_step", [(euler, 1, 1), (heun, 2, 2), (rk4, 4, 4)])
def test_fixed_step_convergence_orders(stepper, order, nfe_per_step):
    errs = []
    for n in (16, 32, 64):
        step = stepper(field)
        x = integrate(X0, torch.linspace(0, 1, n + 1, dtype=torch.float64), step)
        errs.append((x - exact(X0, 1.0)).abs().max().item())
        assert step.nfe == n * nfe_per_step
    observed = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    assert all(abs(o - order) < 0.15 for o in observed), observed


def test_integrate_runs_backwards_in_time():
    x1 = exact(X0, 1.0)
    x = integrate(x1, [1.0 - k / 200 for k in range(201)], rk4(field))
    torch.testing.assert_close(x, X0, atol=1e-9, rtol=0)


def test_adaptive_equals_torchdiffeq_directly():
    f = counted(field)
    x = odeint(f, X0, [0.0, 1.0], rtol=1e-7, atol=1e-9)
    ref = torchdiffeq.odeint(
        lambda t, y: -2 * y + t, X0, torch.tensor([0.0, 1.0], dtype=torch.float64), rtol=1e-7, atol=1e-9
    )
    torch.testing.assert_close(x, ref[-1], atol=1e-12, rtol=0)
    torch.testing.assert_close(x, exact(X0, 1.0), atol=1e-6, rtol=0)
    assert f.nfe > 6  # several accepted dopri5 steps, 6 stages each
    every = odeint(field, X0, [0.0, 0.5, 1.0], return_all=True)
    assert every.shape == (3, 2, 1)
    torch.testing.assert_close(every[1], exact(X0, 0.5), atol=1e-5, rtol=0)


def test_adjoint_gradient_equals_backprop():
    w = torch.tensor(-1.3, dtype=torch.float64, requires_grad=True)

    def f(x, t):
        return w * x + t

    g_direct = torch.autograd.grad(odeint(f, X0, [0.0, 1.0], rtol=1e-8, atol=1e-10).sum(), w)[0]
    g_adj = torch.autograd.grad(
        odeint(f, X0, [0.0, 1.0], rtol=1e-8, atol=1e-10, adjoint=True, adjoint_params=[w]).sum(), w
    )[0]
    torch.testing.assert_close(g_adj, g_direct, atol=1e-6, rtol=1e-6)


def test_tuple_state():
    out = odeint(lambda s, t: (field(s[0], t), -s[1]), (X0, torch.ones(2, dtype=torch.float64)), [0.0, 1.0])
    torch.testing.assert_close(out[0], exact(X0, 1.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], torch.full((2,), math.exp(-1), dtype=torch.float64), atol=1e-5, rtol=0)


def _net(d: int):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(d, d, generator=g, dtype=torch.float64)
    b = torch.randn(d, generator=g, dtype=torch.float64)
    return lambda x: torch.tanh(x @ W + b) * x.sum(1, keepdim=True)


def test_exact_divergence_equals_jacobian_trace():
    f = _net(5)
    x = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out, div = divergence(f, x)
    torch.testing.assert_close(out, f(x))
    want = torch.stack([torch.trace(torch.autograd.functional.jacobian(lambda y: f(y[None])[0], xi)) for xi in x])
    torch.testing.assert_close(div, want)
    with torch.no_grad():  # sampling / likelihood: nothing kept
        out, div2 = divergence(f, x)
    assert not div2.requires_grad and not out.requires_grad
    torch.testing.assert_close(div2, want)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(distribution):
    f = _net(4)
    x = torch.randn(1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    _, want = divergence(f, x)
    n = 4000
    _, est = divergence(
        f, x.expand(n, 4), "hutchinson", generator=torch.Generator().manual_seed(3), distribution=distribution
    )
    se = est.std() / n**0.5
    assert se > 0
    assert abs(est.mean() - want[0]) < 4 * se, (est.mean().item(), want.item(), se.item())
    # more probes per sample average away variance: 16 probes cut the spread by about 4
    _, est16 = divergence(
        f, x.expand(500, 4), "hutchinson", 16, torch.Generator().manual_seed(4), distribution=distribution
    )
    assert 2.5 < est.std() / est16.std() < 6


def test_divergence_keeps_graph_when_grad_enabled():
    w = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, dtype=torch.float64)
    _, div = divergence(lambda y: torch.sin(w * y), x)
    (g,) = torch.autograd.grad(div.sum(), w)
    # div = sum_i w cos(w x_i); d/dw = sum_i cos(w x_i) - w x_i sin(w x_i)
    torch.testing.assert_close(g, (torch.cos(w * x) - w * x * torch.sin(w * x)).sum().detach())


def test_ddim_eta0_is_euler_on_the_probability_flow_ode():
    sched = NoiseSchedule.from_name("linear", 1000)
    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 3, generator=g, dtype=torch.float64) / 3

    def model(x, t):
        return torch.tanh(x @ W) * (1 + t[:, None].to(x.dtype) / 1000)

    steps = 20
    ts = ddim_timesteps(1000, steps).tolist() + [-1]
    a = [sched.alpha_bar(t) for t in ts]  # alpha_bar(-1) = 1
    sig = [((1 - ai) / ai) ** 0.5 for ai in a]  # DDIM's time variable sigma_bar, descending to 0
    t_of = dict(zip(sig, ts))
    a_of = dict(zip(sig, a))

    def pf(xbar, s):  # d xbar / d sigma_bar = eps(sqrt(a) xbar, t)
        return model(xbar * a_of[s] ** 0.5, torch.full((xbar.shape[0],), t_of[s]))

    x_T = torch.randn(8, 3, generator=g, dtype=torch.float64)
    step = euler(pf)
    xbar0 = integrate(x_T / a[0] ** 0.5, sig, step)
    ref = sample_ddim(model, x_T, sched, steps, eta=0.0)
    torch.testing.assert_close(xbar0, ref, atol=1e-10, rtol=1e-10)
    assert step.nfe == steps


def test_nfe_counter_accumulates_and_resets():
    c = NFECounter(field)
    assert counted(c) is c
    step = heun(c)
    integrate(X0, [0.0, 0.5, 1.0], step)
    assert c.nfe == step.nfe == 4
    c.reset()
    assert step.nfe == 0


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda: integrate(X0, [0.0], euler(field)), ConfigError, "at least 2"),
        (lambda: integrate(X0, [0.0, 1.0, 0.5], euler(field)), ConfigError, "monotone|increasing"),
        (lambda: integrate(X0, [0.0, float("nan")], euler(field)), ConfigError, "finite"),
        (lambda: odeint(field, X0, [0.0, 1.0], rtol=0.0), ConfigError, "rtol.*0.0"),
        (lambda: odeint(field, X0, [0.0, 1.0], atol=-1e-3), ConfigError, "atol.*-0.001"),
        (lambda: odeint(field, X0, [0.0, 1.0], method="rk45"), ConfigError, "rk45"),
        (lambda: divergence(lambda y: y[:, :1], X0.expand(2, 2).clone()), ShapeError, r"\(2, 1\)"),
        (lambda: divergence(lambda y: y, X0, "trace"), ConfigError, "trace"),
        (lambda: divergence(lambda y: y, X0, "hutchinson", 0), ConfigError, "probes"),
    ],
)
def test_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call()
