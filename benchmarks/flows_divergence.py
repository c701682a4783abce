"""Cost of a continuous flow's log-likelihood: exact divergence against Hutchinson's estimate, by dimension.

``ContinuousFlow.log_prob`` solves the augmented ODE [x, int div v] (FFJORD); the exact divergence
costs one vector-Jacobian product per dimension, Hutchinson's one per probe (FFJORD, sec. 3.1),
so the exact method's time grows linearly with D and Hutchinson's stays flat. This script
measures both on one randomly initialised MLP field per dimension (speed does not depend on
training), with the same fixed-step RK4 solve, and prints the time ratio and the standard
deviation of Hutchinson's estimate (one probe, fresh per solve) relative to the exact value.

    python benchmarks/flows_divergence.py                      # D in 2, 8, 32, 128; batch 256; 8 RK4 steps
    python benchmarks/flows_divergence.py --dims 2 64 --batch 64 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from notelab.core.runtime import get_device
from notelab.flows.continuous import ContinuousFlow, ContinuousFlowConfig, Solver


def _timed(fn, repeats: int) -> tuple[float, torch.Tensor]:  # noqa: ANN001
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        if out.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def measure(d: int, args: argparse.Namespace, device: torch.device, solver: Solver) -> tuple[float, float, float]:
    """(exact seconds, Hutchinson seconds, mean relative std of Hutchinson) for dimension ``d``."""
    torch.manual_seed(0)
    model = ContinuousFlow(ContinuousFlowConfig(sample_shape=(d,), net_config={"hidden": 128})).to(device).eval()
    x = torch.randn(args.batch, d, device=device)
    gen = torch.Generator(device=device).manual_seed(1)
    with torch.no_grad():
        t_exact, exact = _timed(lambda: model.log_prob(x, solver), args.repeats)
        t_hutch, _ = _timed(lambda: model.log_prob(x, solver, method="hutchinson", generator=gen), args.repeats)
        draws = torch.stack([model.log_prob(x, solver, method="hutchinson", generator=gen) for _ in range(args.draws)])
    return t_exact, t_hutch, statistics.fmean((draws.std(0) / exact.abs()).tolist())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", type=int, nargs="+", default=[2, 8, 32, 128])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=8, help="RK4 steps of the solve")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--draws", type=int, default=10, help="Hutchinson solves for the spread")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = get_device(args.device)
    solver = Solver("rk4", steps=args.steps)
    print(f"device {device}, batch {args.batch}, RK4 {args.steps} steps, best of {args.repeats}")
    print(f"{'D':>5} {'exact s':>9} {'hutch s':>9} {'ratio':>7} {'hutch std / |exact|':>20}")
    for d in args.dims:
        t_exact, t_hutch, spread = measure(d, args, device, solver)
        print(f"{d:>5} {t_exact:>9.3f} {t_hutch:>9.3f} {t_exact / t_hutch:>6.1f}x {spread:>20.4f}")


if __name__ == "__main__":
    main()
