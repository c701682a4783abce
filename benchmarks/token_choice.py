"""The batched decode step's token choice on its own: how long each top-p threshold search takes.

    python benchmarks/token_choice.py [--batches 1 8 32] [--out FILE.json]      # one GPU, under a minute

Rows of bf16 logits over the Llama 3 vocabulary (128,256; N(0, 2^2), temperature 0.8, top-p 0.95, no top-k), as
the engine's step hands them to ``notelab.lm.sampling.choose_tokens``. Each way of finding the threshold
(``notelab.lm.nucleus.pivot_threshold``: a launch a pass; ``row_threshold``: one cooperative launch, the
programs of a row meeting at barriers; each with its sizes in ``WAYS``) is checked against the sort's kept set
(``filter_threshold``), then timed captured in a CUDA graph (median of 50 replays of 20 calls); the draw that
follows (``draw_tokens``) is timed the same way for scale.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from functools import partial

import torch

from notelab.lm.nucleus import draw_tokens, pivot_threshold, row_threshold
from notelab.lm.sampling import filter_threshold

V = 128256
WAYS: dict[str, Callable] = {
    "pivot_threshold (a launch a pass)": pivot_threshold,
    "row_threshold": row_threshold,
    "row_threshold, blocks of 1024": partial(row_threshold, block=1024),
    "row_threshold, blocks of 4096": partial(row_threshold, block=4096),
    "row_threshold, 4 warps": partial(row_threshold, warps=4),
    "row_threshold, 16 warps": partial(row_threshold, warps=16),
    "row_threshold, two programs a multiprocessor": None,  # filled in main: needs the device's count
}


def graph_us(fn: Callable[[], object], calls: int = 20, reps: int = 50) -> float:
    """Microseconds a call of ``fn``, ``calls`` of them captured in one CUDA graph, median of ``reps`` replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[reps // 2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--out", help="JSON of every figure")
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    WAYS["row_threshold, two programs a multiprocessor"] = partial(row_threshold, programs=2 * sms)
    print(f"# {torch.cuda.get_device_name(dev)}, {sms} multiprocessors, torch {torch.__version__}", flush=True)
    rows = []
    for B in args.batches:
        g = torch.Generator(device=dev).manual_seed(B)
        x = (torch.randn(B, V, generator=g, device=dev) * 2.0).bfloat16()
        t = torch.full((B, 1), 0.8, device=dev)
        k = torch.full((B, 1), V, dtype=torch.long, device=dev)
        top_p = torch.full((B, 1), 0.95, device=dev)
        want = x.float() / t >= filter_threshold(x, k, top_p, temperature=t)
        for name, fn in WAYS.items():
            res: dict = {"B": B, "way": name}
            try:
                got = x.float() / t >= fn(x, k, top_p, False, t)
                res["kept_equals_sort"] = bool(torch.equal(got, want))
                res["us"] = graph_us(partial(fn, x, k, top_p, False, t))
            except Exception as e:  # noqa: BLE001 - a way that cannot run here is reported, the others go on
                res["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(res)
            print(json.dumps(res), flush=True)
        thr = pivot_threshold(x, k, top_p, False, t)
        seed, counter = torch.arange(B, device=dev), torch.zeros(B, dtype=torch.long, device=dev)
        res = {
            "B": B,
            "way": "draw_tokens (after the threshold)",
            "us": graph_us(partial(draw_tokens, x, t, thr, seed, counter)),
        }
        rows.append(res)
        print(json.dumps(res), flush=True)
    print("\n| way | " + " | ".join(f"{b} rows: us" for b in args.batches) + " |")
    print("| --- |" + " ---: |" * len(args.batches))
    for name in [*WAYS, "draw_tokens (after the threshold)"]:
        cells = []
        for b in args.batches:
            r = next(r for r in rows if r["B"] == b and r["way"] == name)
            cells.append(f"{r['us']:.1f}" if "us" in r else "failed")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
