"""NICE and RealNVP on real MNIST: test bits/dim.

NICE (Dinh et al. 2015) reports about 4.4 bits/dim on MNIST (the note's anchor) with four
couplings of five 1,000-unit layers; RealNVP (Dinh et al. 2017) is a multi-scale convolutional
flow (checkerboard and channel-wise couplings, squeeze, factor-out), which ``notelab.flows`` builds
for ``realnvp`` on images (``--arch auto``; ``--arch mlp`` couples the flattened image instead).
This script trains them through ``notelab.flows`` (``train_flow`` -> ``notelab.train.fit``) on an
MNIST image folder (``train/<digit>/*.png``, ``test/<digit>/*.png``, e.g.
``../shared/data/mnist_png`` unpacked), dequantised with 256 levels, and prints the test bits/dim
of each model. ``--hidden`` / ``--depth`` are the conditioners' width and depth: MLP units and
layers, or conv channels and residual blocks for the multi-scale flow.

    python benchmarks/flows_mnist.py --data /tmp/mnist --models realnvp --arch mlp --steps 1000 --lr 3e-3
    python benchmarks/flows_mnist.py --data /tmp/mnist --models nice --steps 4000 --lr 5e-3
    python benchmarks/flows_mnist.py --data /tmp/mnist --models realnvp --hidden 64 --depth 2 \\
        --steps 4000 --max-images 60000 --test-images 10000 --device cuda --json out.json --png samples.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from notelab.data import load_dataset
from notelab.eval import save_image_grid
from notelab.flows.train import FlowSpec, draw, evaluate, train_flow
from notelab.train import TrainConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder with train/ and test/ image folders")
    p.add_argument("--models", nargs="+", default=["nice", "realnvp"])
    p.add_argument("--arch", default="auto", choices=("auto", "mlp", "multiscale"))
    p.add_argument("--max-images", type=int, default=20000, help="training images read (a seeded subset)")
    p.add_argument("--test-images", type=int, default=5000)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the flow (ActNorm's first-batch init breaks graphs)"
    )
    p.add_argument("--json", help="write each model's figures here as they are measured")
    p.add_argument("--png", help="write 64 samples of the last model here")
    args = p.parse_args()
    start = time.perf_counter()
    root = Path(args.data)
    train = load_dataset(root / "train", channels=1, max_images=args.max_images).x
    test = load_dataset(root / "test", channels=1, max_images=args.test_images).x
    print(
        f"read {len(train)} train / {len(test)} test images of shape {tuple(train.shape[1:])} "
        f"in {time.perf_counter() - start:.0f} s",
        flush=True,
    )
    results = {}
    for name in args.models:
        spec = FlowSpec(model=name, n_bins=256, hidden=args.hidden, depth=args.depth, arch=args.arch)
        config = TrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            warmup_steps=min(200, args.steps // 10),  # a deep flow's first steps are its least stable
            device=args.device,
            progress=False,
            log_every=500,
            compile="auto" if args.compile else False,
        )
        t0 = time.perf_counter()
        model, _ = train_flow(spec, train, config)
        seconds = time.perf_counter() - t0
        score = evaluate(model, test.to(next(model.parameters()).device), n_bins=256)
        params = sum(p.numel() for p in model.parameters())
        arch = getattr(model.config, "arch", "-")
        print(
            f"{name} ({arch}): {params:,} parameters, {args.steps} steps in {seconds:.0f} s; "
            f"test {score['bits_per_dim']:.3f} bits/dim ({score['log_likelihood']:.1f} nats per image, "
            f"{len(test)} test images)",
            flush=True,
        )
        results[name] = {"arch": arch, "parameters": params, "steps": args.steps, "train_seconds": seconds, **score}
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        if args.png:
            samples, _ = draw(
                model, 64, generator=torch.Generator(device=next(model.parameters()).device).manual_seed(0)
            )
            save_image_grid(samples.float().clamp(-1, 1).cpu(), args.png)


if __name__ == "__main__":
    main()
