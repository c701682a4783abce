"""NICE and RealNVP (MLP couplings on flattened images) on real MNIST: test bits/dim.

NICE (Dinh et al. 2015) reports about 4.4 bits/dim on MNIST (the note's anchor) with four
couplings of five 1,000-unit layers; this script trains the same family through ``notelab.flows``
(``train_flow`` -> ``notelab.train.fit``) at a size a CPU can run, on an MNIST image folder
(``train/<digit>/*.png``, ``test/<digit>/*.png``, e.g. ``../shared/data/mnist_png`` unpacked),
dequantised with 256 levels, and prints the test bits/dim of each model.

    python benchmarks/flows_mnist.py --data /tmp/mnist --models realnvp --steps 1000 --lr 3e-3
    python benchmarks/flows_mnist.py --data /tmp/mnist --models nice --steps 4000 --lr 5e-3
    python benchmarks/flows_mnist.py --data /tmp/mnist --hidden 1000 --depth 5 --steps 30000 --device cuda
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from notelab.data import load_dataset
from notelab.flows.train import FlowSpec, evaluate, train_flow
from notelab.train import TrainConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder with train/ and test/ image folders")
    p.add_argument("--models", nargs="+", default=["nice", "realnvp"])
    p.add_argument("--max-images", type=int, default=20000, help="training images read (a seeded subset)")
    p.add_argument("--test-images", type=int, default=5000)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    root = Path(args.data)
    t0 = time.perf_counter()
    train = load_dataset(root / "train", channels=1, max_images=args.max_images).x
    test = load_dataset(root / "test", channels=1, max_images=args.test_images).x
    print(
        f"read {len(train)} train / {len(test)} test images of shape {tuple(train.shape[1:])} "
        f"in {time.perf_counter() - t0:.0f} s"
    )
    for name in args.models:
        spec = FlowSpec(model=name, n_bins=256, hidden=args.hidden, depth=args.depth)
        config = TrainConfig(
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, device=args.device, progress=False, log_every=500
        )
        t0 = time.perf_counter()
        model, _ = train_flow(spec, train, config)
        seconds = time.perf_counter() - t0
        score = evaluate(model, test.to(next(model.parameters()).device), n_bins=256)
        params = sum(p.numel() for p in model.parameters())
        print(
            f"{name}: {params:,} parameters, {args.steps} steps in {seconds:.0f} s; "
            f"test {score['bits_per_dim']:.3f} bits/dim ({score['log_likelihood']:.1f} nats per image)"
        )


if __name__ == "__main__":
    main()
