"""Training throughput against sequence length: Transformer vs LSTM vs GRU encoder-decoders at equal size.

The parallelism claim of Vaswani et al. (2017, sec. 4, Table 1): a self-attention layer needs O(1)
sequential operations per sequence, a recurrent layer O(n). Each model is a ``notelab.seq``
encoder-decoder; the LSTM / GRU widths are chosen so that their parameter count matches the
Transformer's (the counts are printed). The RNNs use Luong's bilinear attention (fused SDPA), so
what differs is the recurrence; cuDNN runs their cells on GPU.

At each length L every model runs forward + backward of the cross entropy on a random batch of
``--tokens // L`` pairs of L source and L target tokens; the models are timed interleaved, best
of ``--repeats``, after a warmup (which also absorbs ``torch.compile``).

    python benchmarks/seq_throughput.py --device cpu --lengths 32 64 128 256 --d-model 64
    python benchmarks/seq_throughput.py --device cuda --precision bf16 --d-model 512 --layers 6 \\
        --tokens 65536 --lengths 32 64 128 256 512 1024 2048 4096

The table gives training tokens/s (source + target) per model and the ratios Transformer / LSTM
and Transformer / GRU; the parallelism claim predicts that the ratios grow with L.
"""

from __future__ import annotations

import argparse
import platform

import torch

from notelab.core.runtime import get_device
from notelab.seq.factory import build_model, count_params
from notelab.seq.probes import train_throughput

MODELS = ("transformer", "lstm", "gru")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16")
    p.add_argument("--compile", action="store_true", help="torch.compile each model")
    p.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024])
    p.add_argument("--tokens", type=int, default=8192, help="batch * length, the same at every length")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2, help="encoder and decoder layers of every model")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    device = get_device(args.device)
    torch.manual_seed(0)
    models = {
        m: build_model(
            m,
            args.vocab,
            max(args.lengths),
            d_model=args.d_model,
            n_layers=args.layers,
            n_heads=args.heads,
            dropout=0.0,
            attention="general",
        ).to(device)
        for m in MODELS
    }
    print(f"# seq training throughput on {device_name(device)}, precision {args.precision}, compile {args.compile}")
    print("# params: " + ", ".join(f"{m} {count_params(model):,}" for m, model in models.items()))
    print(f"# d_model {args.d_model}, layers {args.layers}, {args.tokens} tokens per batch (source + target = 2x)")
    header = ["length", "batch", *(f"{m} tok/s" for m in MODELS), "T/LSTM", "T/GRU"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for length in args.lengths:
        batch = max(1, args.tokens // length)
        rate = train_throughput(
            models,
            length,
            batch,
            repeats=args.repeats,
            warmup=args.warmup,
            device=device,
            precision=args.precision,
            seed=length,
            compile=args.compile,
        )
        cells = [f"{rate[m]:,.0f}" for m in MODELS]
        ratios = [f"{rate['transformer'] / rate['lstm']:.2f}", f"{rate['transformer'] / rate['gru']:.2f}"]
        print(f"| {length} | {batch} | " + " | ".join(cells + ratios) + " |", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
