"""Parity with diffusers' DDIMScheduler / DDPMScheduler on the same schedule, model output, sample, noise.

Diffusers keeps its tables in float32: its alpha_bar is a float32 cumulative product and it forms
1 - alpha_bar_t / alpha_bar_t' in float32, which near t = 0 (where the ratio is 1 - 1e-4) keeps only
~3 digits. Its stock float32 output therefore differs from the exact step by up to ~1e-3 at the
first timesteps (measured below). To compare the *formulas*, the main tests run diffusers' own
``step`` code on float64 tables of the same betas and float64 inputs, where the two agree to 1e-10
(far inside the 1e-5 asked); a float32 test then shows that our float32 step is closer to the exact
value than stock diffusers is.
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402

from notelab.core.errors import ConfigError  # noqa: E402
from notelab.diffusion import (  # noqa: E402
    PREDICTION_TYPES,
    NoiseSchedule,
    ddim_step,
    ddim_timesteps,
    ddpm_step,
    sample_ddim,
)

T = 1000
SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")
ETAS = (0.0, 0.5, 1.0)
TOL = {"atol": 1e-10, "rtol": 1e-10}


def exact(scheduler, schedule: NoiseSchedule):
    """Diffusers' scheduler with float64 tables of ``schedule``'s betas (its code, exact arithmetic)."""
    scheduler.betas = schedule.betas.clone()
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
    if isinstance(scheduler, DDIMScheduler):
        scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    else:
        scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


def diffusers_prev(t: int, steps: int) -> int:
    """The previous timestep diffusers' DDIMScheduler.step uses: t - T // S."""
    return t - T // steps


def transitions(steps: int, spacing: str) -> list[tuple[int, int]]:
    ts = ddim_timesteps(T, steps, spacing).tolist()
    return list(zip(ts, ts[1:] + [-1]))


def agrees(t: int, t_prev: int, steps: int) -> bool:
    d = diffusers_prev(t, steps)
    return d == t_prev or (d < 0 and t_prev < 0)


def randn(*shape: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("name", SCHEDULES)
def test_beta_schedules_match_diffusers(name):
    ours = NoiseSchedule.from_name(name, T)
    theirs = DDIMScheduler(beta_schedule=name, num_train_timesteps=T)
    torch.testing.assert_close(ours.betas.float(), theirs.betas, atol=0, rtol=1e-6)
    # float32 cumprod drifts by ~1e-5 relative over 1000 factors
    torch.testing.assert_close(ours.alphas_cumprod.float(), theirs.alphas_cumprod, atol=1e-7, rtol=5e-5)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [1, 7, 10, 30, 50, 333, 999, 1000])
def test_ddim_timesteps_match_diffusers(spacing, steps):
    theirs = DDIMScheduler(timestep_spacing=spacing)
    theirs.set_timesteps(steps)
    assert torch.equal(ddim_timesteps(T, steps, spacing), theirs.timesteps)
    if spacing == "leading" and steps == T:
        # diffusers returns timestep 1000 here, one past its alphas_cumprod table
        with pytest.raises(ConfigError, match="steps_offset"):
            ddim_timesteps(T, steps, spacing, steps_offset=1)
    elif spacing == "leading":
        offset = DDIMScheduler(timestep_spacing=spacing, steps_offset=1)
        offset.set_timesteps(steps)
        assert torch.equal(ddim_timesteps(T, steps, spacing, steps_offset=1), offset.timesteps)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", SCHEDULES)
def test_ddim_step_matches_diffusers(name, spacing, prediction_type):
    """Every (t, t') where diffusers' previous timestep is the true next one; see the bug test below."""
    schedule = NoiseSchedule.from_name(name, T)
    compared = 0
    for steps in (10, 30):  # 1000 / 30 is not an integer: uneven gaps for trailing / linspace
        ref = exact(DDIMScheduler(beta_schedule=name, clip_sample=False, prediction_type=prediction_type), schedule)
        ref.register_to_config(timestep_spacing=spacing)
        ref.set_timesteps(steps)
        for i, (t, t_prev) in enumerate(transitions(steps, spacing)):
            if not agrees(t, t_prev, steps):
                continue
            out, x, z = (
                randn(2, 3, 4, 4, seed=3 * i),
                randn(2, 3, 4, 4, seed=3 * i + 1),
                randn(2, 3, 4, 4, seed=3 * i + 2),
            )
            for eta in ETAS:
                theirs = ref.step(out, t, x, eta=eta, variance_noise=z).prev_sample
                ours = ddim_step(out, t, t_prev, x, schedule, eta, prediction_type, z)
                torch.testing.assert_close(ours, theirs, **TOL)
                compared += 1
    n_transitions = sum(len(transitions(s, spacing)) for s in (10, 30))
    assert compared >= (n_transitions if spacing == "leading" else 2) * len(ETAS)


@pytest.mark.parametrize("name", SCHEDULES)
def test_ddim_clipping_and_thresholding_match_diffusers(name):
    schedule = NoiseSchedule.from_name(name, T)
    options = [
        {"clip_sample": True},
        {"clip_sample": True, "clip_sample_range": 0.5},
        {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 3.0},
    ]
    for i, opts in enumerate(options):
        ref = exact(DDIMScheduler(beta_schedule=name, **{"clip_sample": False, **opts}), schedule)
        ref.set_timesteps(10)
        for t, t_prev in transitions(10, "leading"):
            out, x, z = randn(2, 3, 4, 4, seed=t), 3 * randn(2, 3, 4, 4, seed=t + 1), randn(2, 3, 4, 4, seed=t + 2)
            for use_clipped in (False, True):
                theirs = ref.step(out, t, x, eta=0.5, variance_noise=z, use_clipped_model_output=use_clipped)
                ours = ddim_step(
                    out, t, t_prev, x, schedule, 0.5, noise=z, use_clipped_model_output=use_clipped, **opts
                )
                torch.testing.assert_close(ours, theirs.prev_sample, **TOL, msg=f"options {i}, t={t}")


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("name", SCHEDULES)
def test_ddpm_step_matches_diffusers(name, prediction_type, variance_type):
    """The full chain (t' = t - 1) with the same variance noise, drawn from equal generators."""
    schedule = NoiseSchedule.from_name(name, T)
    ref = DDPMScheduler(beta_schedule=name, clip_sample=False, prediction_type=prediction_type)
    ref = exact(ref, schedule)
    ref.register_to_config(variance_type=variance_type)
    ref.variance_type = variance_type
    for t in (999, 998, 750, 500, 100, 10, 2, 1, 0):
        out, x = randn(2, 3, 4, 4, seed=t), randn(2, 3, 4, 4, seed=t + 1000)
        theirs = ref.step(out, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(t), dtype=x.dtype)
        torch.testing.assert_close(ddpm_step(out, t, x, schedule, variance_type, prediction_type, z), theirs, **TOL)


def test_strided_ddpm_step_matches_diffusers():
    """DDPMScheduler.set_timesteps(S) steps between consecutive timesteps of the subsequence."""
    schedule = NoiseSchedule.from_name("linear", T)
    ref = exact(DDPMScheduler(clip_sample=False), schedule)
    ref.set_timesteps(20)
    for i, (t, t_prev) in enumerate(transitions(20, "leading")):
        out, x = randn(2, 5, seed=i), randn(2, 5, seed=i + 100)
        theirs = ref.step(out, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(i), dtype=x.dtype)
        torch.testing.assert_close(ddpm_step(out, t, x, schedule, noise=z, t_prev=t_prev), theirs, **TOL)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sample_ddim_matches_a_diffusers_scheduler_loop(eta):
    """Whole trajectories: the same network, x_T and generator seed give the same samples."""
    schedule = NoiseSchedule.from_name("scaled_linear", T, 0.00085, 0.012)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return net(torch.cat([x, t[:, None].double() / T], dim=1))

    x_T = randn(6, 2, seed=0)
    ref = exact(
        DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False), schedule
    )
    ref.set_timesteps(25)
    x, g = x_T.clone(), torch.Generator().manual_seed(7)
    with torch.no_grad():
        for t in ref.timesteps:
            x = ref.step(model(x, t.repeat(6)), int(t), x, eta=eta, generator=g).prev_sample
    ours = sample_ddim(model, x_T, schedule, 25, eta=eta, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, x, **TOL)


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_float32_step_is_closer_to_exact_than_stock_diffusers(kind):
    """In float32, the gap to stock diffusers is diffusers' float32 rounding, not a formula difference."""
    schedule = NoiseSchedule.from_name("linear", T)
    make = DDIMScheduler if kind == "ddim" else DDPMScheduler
    stock, ref = make(clip_sample=False), exact(make(clip_sample=False), schedule)
    if kind == "ddim":
        stock.set_timesteps(T)
        ref.set_timesteps(T)
    worst_ours = worst_stock = 0.0
    for t in (999, 500, 20, 3, 2, 1):
        out, x = randn(4, 3, 8, 8, seed=t), randn(4, 3, 8, 8, seed=t + 1)
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        if kind == "ddim":
            exact_out = ref.step(out, t, x, eta=1.0, variance_noise=z).prev_sample
            stock_out = stock.step(out.float(), t, x.float(), eta=1.0, variance_noise=z.float()).prev_sample
            ours = ddim_step(out.float(), t, t - 1, x.float(), schedule, 1.0, noise=z.float())
        else:
            # DDPMScheduler draws its own noise: float64 for the exact run, float32 for the stock one
            # (a different draw), so the exact run is moved onto the float32 draw that the others use.
            z32 = torch.randn(x.shape, generator=torch.Generator().manual_seed(t), dtype=torch.float32)
            std = ref._get_variance(t) ** 0.5 if t > 0 else 0.0
            exact_out = ref.step(out, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
            exact_out = exact_out + std * (z32.double() - z)
            gen = torch.Generator().manual_seed(t)
            stock_out = stock.step(out.float(), t, x.float(), generator=gen).prev_sample
            ours = ddpm_step(out.float(), t, x.float(), schedule, noise=z32)
        worst_ours = max(worst_ours, (ours.double() - exact_out).abs().max().item())
        worst_stock = max(worst_stock, (stock_out.double() - exact_out).abs().max().item())
    print(f"{kind}: max |ours_fp32 - exact| = {worst_ours:.2e}, max |diffusers_fp32 - exact| = {worst_stock:.2e}")
    assert worst_ours < 1e-5 and worst_ours < worst_stock / 2


@pytest.mark.parametrize("spacing, steps", [("linspace", 10), ("linspace", 30), ("trailing", 30), ("trailing", 7)])
def test_where_diffusers_ddim_steps_to_the_wrong_timestep_ours_follows_the_paper(spacing, steps):
    """diffusers' DDIMScheduler.step takes the previous timestep as t - T // S (scheduling_ddim.py,
    "1. get previous step value"). That is the next timestep of the subsequence only when the gaps
    are all T // S, as for "leading". For "linspace" with S = 10 the timesteps are 999, 888, ..., 0
    (gaps of 111), yet diffusers steps 999 -> 899 and is then handed that sample as if it were at
    888; for "trailing" with 1000 / S not an integer the gaps alternate (33, 33, 34, ... for S = 30) and
    every third step lands one timestep off (the last on t = 0 instead of x0). DDIM's update
    (eq. 12) is defined between consecutive elements of the subsequence tau (sec. 4.2), so ours
    steps to the next timestep of the list.

    At each such step: diffusers' value differs from ours, and ours equals diffusers' own step
    made to use the true gap (num_inference_steps set to an S' with T // S' = the gap), i.e. the
    step to the true next timestep.
    """
    schedule = NoiseSchedule.from_name("linear", T)
    ref = exact(DDIMScheduler(clip_sample=False, timestep_spacing=spacing), schedule)
    ref.set_timesteps(steps)
    mismatches = 0
    for i, (t, t_prev) in enumerate(transitions(steps, spacing)):
        if agrees(t, t_prev, steps):
            continue
        mismatches += 1
        # a scheduler whose T // S is the true gap: T' = gap, S' = 1 (step reads T only for this);
        # after the last timestep t' = -1, where diffusers may land on t = 0 instead of x0
        true_gap = exact(DDIMScheduler(clip_sample=False), schedule)
        true_gap.set_timesteps(steps)
        true_gap.register_to_config(num_train_timesteps=t - t_prev)
        true_gap.num_inference_steps = 1
        out, x, z = randn(2, 3, 4, 4, seed=i), randn(2, 3, 4, 4, seed=i + 50), randn(2, 3, 4, 4, seed=i + 99)
        for eta in ETAS:
            ours = ddim_step(out, t, t_prev, x, schedule, eta, noise=z)
            buggy = ref.step(out, t, x, eta=eta, variance_noise=z).prev_sample
            to_true_next = true_gap.step(out, t, x, eta=eta, variance_noise=z).prev_sample
            torch.testing.assert_close(ours, to_true_next, **TOL)
            assert (ours - buggy).abs().max().item() > 1e-4
    assert mismatches >= 2
