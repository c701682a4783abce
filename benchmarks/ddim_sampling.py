"""Per-step time of notelab's DDIM sampler loop against diffusers' ``DDIMScheduler`` loop.

Both loops drive the same network (notelab's UNet, random weights: speed does not depend on
training) from the same initial noise, with the same schedule (linear betas 1e-4..0.02, T=1000),
the same ``leading`` timesteps and eta=0. Before timing, the two sample sets are compared (max
abs difference); then each loop runs ``--repeats`` times and the best time is kept.

    python benchmarks/ddim_sampling.py --device cpu --steps 50 --batch 64 --image-size 8
    python benchmarks/ddim_sampling.py --device cuda --precision bf16 --image-size 32 --batch 256

The table gives ms per step for the network alone, our loop and diffusers' loop, and the ratio
ours / diffusers (below 1: ours is faster), first around the UNet, then around a "null" network
(a fixed linear map) whose rows time only the samplers' own per-step work.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from notelab.core.denoisers import UNet, UNetConfig
from notelab.core.runtime import get_device
from notelab.diffusion.ddim import ddim_timesteps, sample_ddim
from notelab.diffusion.schedules import NoiseSchedule

if TYPE_CHECKING:
    from diffusers import DDIMScheduler


def diffusers_ddim(net: torch.nn.Module, x_T: torch.Tensor, scheduler: DDIMScheduler, steps: int) -> torch.Tensor:
    scheduler.set_timesteps(steps, device=x_T.device)
    x = x_T
    for t in scheduler.timesteps:
        eps = net(x, t.expand(x.shape[0]))
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    return x


def ours_ddim(net: torch.nn.Module, x_T: torch.Tensor, schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    return sample_ddim(net, x_T, schedule, steps, eta=0.0, spacing="leading")


def best_times(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """The best of ``repeats`` wall times of each function, run interleaved so that a burst of load
    on a shared machine hits every contender alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate who goes first
            fn = fns[name]
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, nargs="+", default=[50])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--image-size", type=int, default=8)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--base-channels", type=int, default=32)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="bf16 autocast (CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (both loops share it)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)

    from diffusers import DDIMScheduler

    if args.threads:
        torch.set_num_threads(args.threads)
    device = get_device(args.device)
    torch.manual_seed(0)
    size = args.image_size
    mults = (1, 2) if size <= 8 else (1, 2, 2) if size <= 32 else (1, 2, 2, 2)
    net = (
        UNet(
            UNetConfig(
                in_channels=args.channels,
                image_size=size,
                base_channels=args.base_channels,
                channel_mults=mults,
                num_res_blocks=1,
            )
        )
        .to(device)
        .eval()
    )
    if args.compile:
        net = torch.compile(net)
    schedule = NoiseSchedule.from_name("linear", 1000, 1e-4, 0.02)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",
    )
    amp = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if args.precision == "bf16"
        else contextlib.nullcontext()
    )
    x_T = torch.randn(args.batch, args.channels, size, size, generator=torch.Generator().manual_seed(0)).to(device)

    print(f"# DDIM sampling loop, notelab vs diffusers {__import__('diffusers').__version__}")
    print(
        f"# device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu_name()}), "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, precision {args.precision}, "
        f"compile {args.compile}, batch {args.batch}, image {args.channels}x{size}x{size}, "
        f"UNet {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params"
    )
    columns = ["network", "steps", "max abs diff (relative)", "net ms/step", "ours ms/step", "diffusers ms/step"]
    print("| " + " | ".join([*columns, "ours / diffusers"]) + " |")
    print("|---" * 7 + "|")
    # The null network (a fixed linear map) leaves only the samplers' own per-step work to time.
    nets = {"UNet": net, "null": lambda x, t: 0.1 * x}
    # Timing two loops is only fair when they compute the same thing; bf16 rounding compounds over steps.
    tolerance = 1e-4 if args.precision == "fp32" else 5e-2
    with torch.inference_mode(), amp:
        for name, f in nets.items():
            for steps in args.steps:
                cells, rel = compare(f, x_T, schedule, scheduler, steps, args.repeats)
                print("| " + " | ".join([name, *cells]) + " |")
                if rel > tolerance:
                    raise SystemExit(f"the two loops disagree: relative max abs diff {rel:.1e} > {tolerance:g}")


def compare(
    net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    scheduler: DDIMScheduler,
    steps: int,
    repeats: int,
) -> tuple[list[str], float]:
    """Table cells (agreement of the two loops, ms per step of the network alone and of each loop)
    and the relative max abs difference of the two loops' samples."""
    ours = ours_ddim(net, x_T, schedule, steps).float()
    theirs = diffusers_ddim(net, x_T, scheduler, steps).float()
    diff = (ours - theirs).abs().max().item()
    rel = diff / max(theirs.abs().max().item(), 1e-12)
    ts = ddim_timesteps(1000, steps, "leading").to(x_T.device)

    def net_only() -> None:
        for t in ts:
            net(x_T, t.expand(x_T.shape[0]))

    t = best_times(
        {
            "net": net_only,
            "ours": lambda: ours_ddim(net, x_T, schedule, steps),
            "diffusers": lambda: diffusers_ddim(net, x_T, scheduler, steps),
        },
        repeats,
        x_T.device,
    )
    ms = [1000 * t[k] / steps for k in ("net", "ours", "diffusers")]
    cells = [str(steps), f"{diff:.1e} ({rel:.1e})", *(f"{m:.3f}" for m in ms), f"{t['ours'] / t['diffusers']:.3f}"]
    return cells, rel


if __name__ == "__main__":
    main()
