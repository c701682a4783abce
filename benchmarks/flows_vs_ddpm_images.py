"""Flow matching next to DDPM / DDIM on an image folder: one UNet, one training budget, quality against NFE.

The issue's scale run (CIFAR-10 on an H200): ``notelab.core``'s UNet trained once as a DDPM
(``notelab.diffusion``, epsilon prediction, T = 1000) and once as a flow matching vector field
(``notelab.flows``, Lipman's OT path), the same architecture (only the time input is scaled: t in
[0, 1] x 1000 for the flow, integer steps for the DDPM) and the same steps, batch and learning
rate. Each is sampled from the same noise at several numbers of network evaluations (DDIM eta 0
with trailing timesteps; Euler for the flow; dopri5 reports its own NFE), and scored by a
Frechet distance to held-out images. Without Inception weights on an offline machine the
features are the pixels average-pooled to 8x8 per channel ("FD-pixels": FID's formula, not
FID's numbers; lower is better, compare rows, not papers).

    python benchmarks/flows_vs_ddpm_images.py --data /tmp/cifar10/train --test /tmp/cifar10/test \\
        --steps 20000 --batch-size 128 --samples 5000 --device cuda        # the H200 run
    python benchmarks/flows_vs_ddpm_images.py --data digits --steps 200 --samples 200 --nfe 1 10   # CPU smoke

Each row is printed (and ``--json`` rewritten) as soon as it is measured, so a run stopped early
keeps what it measured; ``--png-dir`` gets a grid of each model's samples at ``--png-nfe``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from notelab.core.runtime import get_device
from notelab.data import load_dataset
from notelab.diffusion.pipeline import DiffusionConfig, train_diffusion
from notelab.eval import fd_from_features, save_image_grid
from notelab.flows.continuous import ContinuousFlow, ContinuousFlowConfig, Solver
from notelab.flows.matching import FlowMatchingLoss, OTPath
from notelab.train import TrainConfig, fit


def pixel_features(x: torch.Tensor) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] average-pooled to 8x8 per channel and flattened."""
    return F.adaptive_avg_pool2d(x.float().clamp(-1, 1), 8).flatten(1).cpu()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="training image folder (or digits)")
    p.add_argument("--test", help="held-out image folder (default: the data's test split)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--max-images", type=int)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 5, 10, 20, 50, 100])
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--png-dir", help="write a grid of 64 samples of each model at --png-nfe here")
    p.add_argument("--png-nfe", type=int, default=20, help="the NFE of the sample grids")
    args = p.parse_args()
    start = time.perf_counter()

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {text}", flush=True)

    device = get_device(args.device)
    opts = {k: v for k, v in (("image_size", args.image_size), ("max_images", args.max_images)) if v}
    if args.test:
        train, test = load_dataset(args.data, **opts), load_dataset(args.test, **opts)
    else:
        train, test = load_dataset(args.data, split="train", **opts), load_dataset(args.data, split="test", **opts)
    shape = train.sample_shape
    say(f"read {len(train)} training / {len(test)} held-out images of shape {shape}")
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=min(500, args.steps // 10),
        device=str(device),
        progress=False,
    )
    ddpm_config = DiffusionConfig.for_shape(shape)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ddpm = train_diffusion(train, Path(tmp), config, ddpm_config).to(device)
    ddpm_seconds = time.perf_counter() - t0
    say(f"DDPM: {args.steps} steps in {ddpm_seconds:.0f} s")
    flow_config = ContinuousFlowConfig(
        sample_shape=shape, net="unet", net_config={**ddpm_config.net_config, "time_scale": 1000.0}
    )
    flow = ContinuousFlow(flow_config)
    t0 = time.perf_counter()
    flow = fit(flow, FlowMatchingLoss(OTPath()), train.x, config).model.eval()
    flow_seconds = time.perf_counter() - t0
    say(f"flow matching: {args.steps} steps in {flow_seconds:.0f} s")
    params = sum(q.numel() for q in flow.net.parameters())
    if params != sum(q.numel() for q in ddpm.parameters()):
        sys.exit("the two networks differ in size: the comparison would not be like for like")
    ref = pixel_features(test.x[: args.samples])
    n = min(args.samples, len(test.x))
    noise = torch.randn(n, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    rows: dict[str, list[float]] = {"DDPM + DDIM (eta 0)": [], "flow matching + Euler": []}
    result = {
        "parameters": params,
        "steps": args.steps,
        "train_seconds": {"ddpm": ddpm_seconds, "flow_matching": flow_seconds},
        "samples": n,
        "nfe": [],
        "fd": rows,
        "dopri5": None,
    }

    def record() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))

    for nfe in args.nfe:
        x_ddim = ddpm.sample(n, sampler="ddim", steps=nfe, eta=0.0, spacing="trailing", x_T=noise)
        rows["DDPM + DDIM (eta 0)"].append(fd_from_features(pixel_features(x_ddim), ref))
        x_fm, _ = flow.sample(n, Solver("euler", steps=nfe), x0=noise)
        rows["flow matching + Euler"].append(fd_from_features(pixel_features(x_fm), ref))
        result["nfe"].append(nfe)
        record()
        fd_ddim, fd_fm = rows["DDPM + DDIM (eta 0)"][-1], rows["flow matching + Euler"][-1]
        say(f"NFE {nfe}: FD-pixels DDIM {fd_ddim:.3f}, flow matching {fd_fm:.3f}")
        if args.png_dir and nfe == args.png_nfe:
            Path(args.png_dir).mkdir(parents=True, exist_ok=True)
            save_image_grid(x_ddim[:64].float().clamp(-1, 1).cpu(), Path(args.png_dir) / f"ddim_{nfe}nfe.png")
            save_image_grid(x_fm[:64].float().clamp(-1, 1).cpu(), Path(args.png_dir) / f"flow_matching_{nfe}nfe.png")
    x, nfe_dopri = flow.sample(n, Solver("dopri5", rtol=1e-4, atol=1e-4), x0=noise)
    fd_dopri = fd_from_features(pixel_features(x), ref)
    result["dopri5"] = [nfe_dopri, fd_dopri]
    record()
    print(
        f"{params:,} parameters each; {args.steps} steps: DDPM {ddpm_seconds:.0f} s, flow matching {flow_seconds:.0f} s"
    )
    print(f"FD-pixels to {n} held-out images (lower is better), by network evaluations per sample:")
    print(f"{'sampler':<24}" + "".join(f"{k:>9}" for k in args.nfe))
    for name, fds in rows.items():
        print(f"{name:<24}" + "".join(f"{v:>9.3f}" for v in fds))
    print(f"flow matching + dopri5 (rtol 1e-4): {nfe_dopri} NFE, FD-pixels {fd_dopri:.3f}")


if __name__ == "__main__":
    main()
