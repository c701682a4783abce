"""DDIM sampling as a user calls it, ``DiffusionModel.sample``, against diffusers' ``DDIMScheduler`` loop.

One ``DiffusionModel`` with the network ``DiffusionConfig.for_shape`` gives the data (CIFAR-10's
3x32x32 by default: notelab's UNet, 64 base channels, levels (1, 2, 2), two residual blocks a
level; random weights: speed does not depend on training) and DDPM's schedule (linear betas
1e-4..0.02, T=1000). Both loops take the same initial noise, the same ``leading`` timesteps and
eta=0, and drive that same network:

- notelab: ``model.sample(batch, "ddim", steps, x_T=x_T)`` with its defaults (on CUDA: bf16
  autocast and the network compiled with ``torch.compile``; on CPU: float32, eager);
- diffusers: the documented loop ``for t in scheduler.timesteps: x = scheduler.step(net(x, t), t, x)``
  around ``model.net`` under bf16 autocast (float32 on CPU), eager as diffusers runs it, and for
  reference the same loop around notelab's compiled network.

Before timing, the samples are compared (max abs difference, relative to the largest value);
then each contender runs ``--repeats`` times, interleaved, and the best time is kept; the first
(compiling) call is not timed.

    python benchmarks/ddim_sampling.py                             # CUDA: batch 256, 50 steps, 3x32x32
    python benchmarks/ddim_sampling.py --device cpu --batch 16 --image-size 8 --channels 1 --repeats 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from notelab.core.runtime import get_device
from notelab.diffusion.pipeline import DiffusionConfig, DiffusionModel, sampling_setup

if TYPE_CHECKING:
    from diffusers import DDIMScheduler


def diffusers_ddim(
    net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_T: torch.Tensor, scheduler: DDIMScheduler, steps: int
) -> torch.Tensor:
    scheduler.set_timesteps(steps, device=x_T.device)
    x = x_T
    for t in scheduler.timesteps:
        eps = net(x, t.expand(x.shape[0]))
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    return x


def best_times(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """The best of ``repeats`` wall times of each function, run interleaved so that a burst of load
    on a shared machine hits every contender alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate who goes first
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fns[name]()
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


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)

    import diffusers
    from diffusers import DDIMScheduler

    if args.threads:
        torch.set_num_threads(args.threads)
    device = get_device(args.device)
    torch.manual_seed(0)
    shape = (args.channels, args.image_size, args.image_size)
    model = DiffusionModel(DiffusionConfig.for_shape(shape)).to(device).eval()
    c = model.config
    scheduler = DDIMScheduler(
        num_train_timesteps=c.num_train_timesteps,
        beta_start=c.beta_start,
        beta_end=c.beta_end,
        beta_schedule=c.beta_schedule,
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",
    )
    amp_dtype, compiled = sampling_setup(device)  # what sample() does by default on this device
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    x_T = torch.randn(args.batch, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    n_params = sum(q.numel() for q in model.net.parameters())
    header = (
        f"# DDIM sampling, notelab DiffusionModel.sample (defaults) vs diffusers {diffusers.__version__} DDIMScheduler"
        f"\n# device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu_name()}), "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, sample's defaults here: "
        f"autocast {amp_dtype}, compile {compiled}; batch {args.batch}, image {'x'.join(map(str, shape))}, "
        f"{args.steps} steps, UNet {n_params / 1e6:.2f}M params"
    )
    print(header, flush=True)

    def ours() -> torch.Tensor:
        return model.sample(args.batch, "ddim", args.steps, x_T=x_T)

    def theirs(net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.inference_mode(), amp:
                return diffusers_ddim(net, x_T, scheduler, args.steps)

        return run

    contenders = {"notelab sample (defaults)": ours, "diffusers loop, eager net": theirs(model.net)}
    if compiled:
        contenders["diffusers loop, notelab's compiled net"] = theirs(model.denoiser(True))
    t0 = time.perf_counter()
    first = {name: fn().float() for name, fn in contenders.items()}  # compiles the network once
    warm_s = time.perf_counter() - t0
    ref = first["diffusers loop, eager net"]
    scale = ref.abs().max().item()
    times = best_times(contenders, args.repeats, device)
    base = times["diffusers loop, eager net"]
    rows = []
    print("| loop | ms/step | samples/s | diffusers eager / this | max abs diff to diffusers eager (relative) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, seconds in times.items():
        diff = (first[name] - ref).abs().max().item()
        row = {
            "loop": name,
            "ms_per_step": 1e3 * seconds / args.steps,
            "samples_per_s": args.batch / seconds,
            "speedup_vs_diffusers": base / seconds,
            "max_abs_diff": diff,
            "rel_diff": diff / max(scale, 1e-12),
        }
        rows.append(row)
        print(
            f"| {name} | {row['ms_per_step']:.3f} | {row['samples_per_s']:.0f} | {row['speedup_vs_diffusers']:.2f}x "
            f"| {diff:.2e} ({row['rel_diff']:.1e}) |"
        )
    print(f"# first calls (compile included) took {warm_s:.1f} s together", flush=True)
    result = {"header": header, "rows": rows, "warmup_s": warm_s}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
