"""The batched decode step's products on their own: which way of computing them reads the weights fastest?

    python benchmarks/skinny_products.py [--batches 8 32] [--tiles-out FILE.json] [--out FILE.json]   # one GPU
    python benchmarks/skinny_products.py --tiny                                  # CPU, Triton's interpreter

At batch B (8-32 rows, one token each) a decode step multiplies the rows ``x`` ``(B, K)`` by every weight
``W`` ``(N, K)`` of the model once: ``y = x W^T``, bound by reading ``W``. Each product of the folded decode step
(``notelab.lm.folded``) is timed by cuBLAS (``CUBLAS``, the step's products before ``notelab.lm.skinny``:
``F.linear``; the residual's ``x.addmm_`` for o and down; ``F.linear`` then the SiLU-product kernel for [gate;
up]) and by
``notelab.lm.skinny`` (the weight as the tall operand, one program per ``bn`` outputs, the epilogue fused) at
each of ``TILES`` (and of ``SPLIT_TILES``, K cut over programs, but for the output projection); with
``--cublas-ways``, also by other cuBLAS calls (cuBLASLt; the transposed problem; rows
padded to 16 / 64; split-K by hand: all measured no faster in benchmarks/RESULTS.md, 2026-11-30).

Every product of the Llama-3.2-1B shape (stacked [q; k; v], o, stacked [gate; up], down; 16 layers, so the
weights do not stay in the 50 MB L2 between calls) and the output projection, in bf16, each timed as 16
products (one per layer's copy; the output projection once) captured in a CUDA graph and replayed, in
microseconds a product and % of the copy bandwidth measured in the same run. Each way's result is checked
against float32 torch first. ``--tiles-out``: the fastest tiles per (N, K, B) as JSON, for
``decode_variants.py --skinny-tiles``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from notelab.lm.folded import CUBLAS, gated_silu_torch
from notelab.lm.skinny import Tiles, skinny_add_, skinny_gated, skinny_linear

SHAPES = {  # Llama-3.2-1B: (N, K) of each product, how many copies a step reads; the largest first
    "gate_up": (16384, 2048, 16),
    "down": (2048, 8192, 16),
    "lm_head": (128256, 2048, 1),
    "qkv": (3072, 2048, 16),
    "o": (2048, 2048, 16),
}
KIND = {"qkv": "linear", "lm_head": "linear", "o": "add_", "down": "add_", "gate_up": "gated"}  # the step's use
TILES = [  # (bn, bk, stages, warps) of notelab.lm.skinny, tried per product and batch
    (16, 128, 4, 4), (16, 256, 4, 4), (16, 256, 6, 4), (16, 512, 3, 4), (16, 512, 4, 4), (16, 256, 4, 2),
    (32, 128, 4, 4), (32, 256, 3, 4), (32, 256, 4, 4), (32, 256, 4, 8), (64, 128, 4, 4), (64, 256, 3, 4),
]  # fmt: skip
SPLIT_TILES = [  # (bn, bk, stages, warps, split): K cut into `split` programs, tried on the products but the output's
    (16, 256, 4, 4, 2), (16, 256, 4, 4, 4), (16, 512, 4, 4, 2), (32, 128, 4, 4, 4), (32, 256, 4, 4, 2),
    (32, 256, 4, 4, 4), (32, 256, 4, 4, 8), (64, 64, 6, 4, 8), (64, 128, 4, 4, 2), (64, 128, 4, 4, 4),
    (64, 128, 4, 4, 8), (64, 128, 6, 4, 4), (64, 256, 3, 4, 4), (128, 128, 3, 8, 4), (128, 128, 3, 8, 8),
]  # fmt: skip
EPS = 1e-5


def by_cublas(kind: str) -> Callable:
    """The product by cuBLAS (and the SiLU-product kernel): ``fn(x, w, y)`` (``y`` the residual rows)."""
    return {
        "linear": lambda x, w, y: CUBLAS.linear(x, w),
        "add_": lambda x, w, y: CUBLAS.add_(y, x, w),
        "gated": lambda x, w, y: CUBLAS.gated(x, w, EPS),
    }[kind]


def skinny_way(kind: str, tiles: tuple[int, ...]) -> Callable:
    """The product by ``notelab.lm.skinny`` with ``tiles``: ``fn(x, w, y)``."""
    t = Tiles(*tiles)
    return {
        "linear": lambda x, w, y: skinny_linear(x, w, t),
        "add_": lambda x, w, y: skinny_add_(y, x, w, t),
        "gated": lambda x, w, y: skinny_gated(x, w, EPS, t),
    }[kind]


def _split_k(x: torch.Tensor, w: torch.Tensor, splits: int) -> torch.Tensor:
    """``x w^T`` as ``splits`` batched products over K / splits each, summed (float32 partial sums)."""
    B, K = x.shape
    N = w.shape[0]
    part = torch.bmm(x.view(B, splits, K // splits).transpose(0, 1), w.view(N, splits, K // splits).permute(1, 2, 0))
    return part.sum(0, dtype=torch.float32).to(x.dtype)


def _padded(rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: torch.cat([x, x.new_zeros(rows - x.shape[0], x.shape[1])]) if x.shape[0] < rows else x


# name: (input made once from x, outside the timing; the product of that input and one weight; cuBLASLt)
WAYS: dict[str, tuple[Callable, Callable, bool]] = {
    "x W^T, cuBLASLt": (lambda x: x, lambda x, w: torch.matmul(x, w.t()), True),
    "(W x^T)^T": (lambda x: x.t().contiguous(), lambda xt, w: torch.matmul(w, xt).t(), False),
    "x padded to 16 rows": (_padded(16), lambda x, w: torch.matmul(x, w.t()), False),
    "x padded to 64 rows": (_padded(64), lambda x, w: torch.matmul(x, w.t()), False),
    "split-K 2": (lambda x: x, lambda x, w: _split_k(x, w, 2), False),
    "split-K 4": (lambda x: x, lambda x, w: _split_k(x, w, 4), False),
}


def reference(kind: str, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """float32 result of the product ``kind`` (the rows ``y`` after it, for ``add_``)."""
    if kind == "gated":
        return gated_silu_torch(F.linear(x.float(), w.float()), x.float(), EPS)
    out = F.linear(x.float(), w.float())
    return y.float() + out if kind == "add_" else out


def error_of(kind: str, fn: Callable, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> float:
    """Largest relative error of ``fn`` against :func:`reference` (on a copy of ``y``)."""
    y0 = y.clone()
    got = fn(x, w, y0)
    got = y0 if kind == "add_" else got
    want = reference(kind, x, w, y)
    return float((got.float() - want).abs().max() / want.abs().max().clamp(min=1e-30))


def cublas_way(name: str, x: torch.Tensor, ws: list[torch.Tensor]) -> tuple[float, float]:
    """(relative error against float32 ``F.linear``, seconds a product) of way ``name`` over the copies ``ws``."""
    prep, fn, lt = WAYS[name]
    xin = prep(x)
    before = torch.backends.cuda.preferred_blas_library()
    try:  # the library is fixed when the graph is captured; replays keep it
        if lt:
            torch.backends.cuda.preferred_blas_library("cublaslt")
        got = fn(xin, ws[0])[: x.shape[0]].float()
        want = F.linear(x.float(), ws[0].float())
        err = float((got - want).abs().max() / want.abs().max().clamp(min=1e-30))
        seconds = graph_time(lambda: [fn(xin, w) for w in ws]) / len(ws)
    finally:
        torch.backends.cuda.preferred_blas_library(before)
    return err, seconds


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Bytes read + written per second by ``dst.copy_(src)`` of ``nbytes``, best of three."""
    src = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    best = 0.0
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            dst.copy_(src)
        torch.cuda.synchronize()
        best = max(best, 2 * nbytes * 5 / (time.perf_counter() - t0))
    return best


def graph_time(fn, reps: int = 20) -> float:  # noqa: ANN001
    """Seconds per call of ``fn`` (which launches a fixed sequence), captured in a CUDA graph, median of reps."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def tiny() -> int:
    """Interpreter smoke test: every kind of product by the kernel against float32 torch on small shapes."""
    torch.manual_seed(0)
    for B, (N, K), tiles in [
        (3, (40, 64), (16, 32, 1, 4)),
        (17, (96, 128), (32, 64, 1, 4)),
        (5, (48, 200), (16, 32, 2, 4, 3)),
    ]:
        for kind in ("linear", "add_", "gated"):
            x, y = torch.randn(B, K), torch.randn(B, N)
            w = torch.randn(2 * N if kind == "gated" else N, K)
            err = error_of(kind, skinny_way(kind, tiles), x, w, y)
            print(f"{kind} B={B} N={N} K={K} tiles={tiles}: max relative error {err:.2e}")
            if err > 1e-4:
                return 1
    return 0


def measure(name: str, B: int, bw: float, args: argparse.Namespace, t_start: float) -> dict:
    """Every way of product ``name`` at ``B`` rows: the step's way, each tiling, (--cublas-ways) cuBLAS's others."""
    dev = torch.device("cuda")
    N, K, copies = SHAPES[name]
    kind = KIND[name]
    torch.manual_seed(0)
    ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(B, K, device=dev, dtype=torch.bfloat16)
    n_out = N // 2 if kind == "gated" else N
    y = torch.randn(B, n_out, device=dev, dtype=torch.bfloat16)
    nbytes = N * K * 2

    def timed(fn: Callable) -> tuple[float, float]:
        err = error_of(kind, fn, x, ws[0], y)
        return err, graph_time(lambda: [fn(x, w, y) for w in ws]) / copies

    err, t = timed(by_cublas(kind))
    row = {
        "product": name,
        "N": N,
        "K": K,
        "B": B,
        "cublas_us": t * 1e6,
        "cublas_%": 100 * nbytes / t / bw,
        "cublas_err": err,
    }
    row["tiles"], row["ways"] = {}, {}
    for tiles in TILES + (SPLIT_TILES if name != "lm_head" else []):
        if time.perf_counter() - t_start > args.budget_s:
            break
        try:
            err, tt = timed(skinny_way(kind, tiles))
        except Exception as e:  # noqa: BLE001 - a tiling that does not compile (e.g. shared memory) is reported
            print(f"  {name} B={B} {tiles}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        row["tiles"][str(tiles)] = {"us": tt * 1e6, "%": 100 * nbytes / tt / bw, "relative_error": err}
    for way in WAYS if args.cublas_ways and kind == "linear" else ():
        if way.startswith("split-K") and K % int(way.split()[-1]):
            continue
        err, tw = cublas_way(way, x, ws)
        row["ways"][way] = {"us": tw * 1e6, "%": 100 * nbytes / tw / bw, "relative_error": err}
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--budget-s", type=float, default=200.0, help="skip the tilings past this long")
    p.add_argument("--cublas-ways", action="store_true", help="also cuBLAS's other calls (plain products)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test through TRITON_INTERPRET=1")
    p.add_argument("--tiles-out", help="JSON: the fastest correct tiles per (N, K, B), for decode_variants.py")
    p.add_argument("--out", help="JSON of every figure")
    args = p.parse_args(argv)
    if args.tiny:
        return tiny()
    import triton

    dev = torch.device("cuda")
    t_start = time.perf_counter()
    bw = copy_bandwidth(dev)
    print(f"# {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, triton {triton.__version__}; "
          f"copy bandwidth {bw / 1e9:,.0f} GB/s", flush=True)  # fmt: skip
    results: dict = {"copy_GB_per_s": bw / 1e9, "rows": []}
    best_tiles = []
    for name in args.shapes:
        for B in args.batches:
            row = measure(name, B, bw, args, t_start)
            ok = {k: v for k, v in row["tiles"].items() if v["relative_error"] < 2e-2}
            if ok:
                best = min(ok, key=lambda k: ok[k]["us"])
                row.update(best_tiles=best, best_us=ok[best]["us"], best_pct=ok[best]["%"])
                best_tiles.append({"N": row["N"], "K": row["K"], "B": B, "kind": KIND[name], "tiles": json.loads(
                    best.replace("(", "[").replace(")", "]"))})  # fmt: skip
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    print("\n| product | N x K | B | cuBLAS: us, % of copy bw | notelab.lm.skinny, fastest tiles | us | % |")
    print("| --- | --- | ---: | ---: | --- | ---: | ---: |")
    for r in results["rows"]:
        tail = f"{r['best_tiles']} | {r['best_us']:.1f} | {r['best_pct']:.0f}%" if "best_tiles" in r else "- | - | -"
        print(
            f"| {r['product']} | {r['N']} x {r['K']} | {r['B']} | {r['cublas_us']:.1f}, {r['cublas_%']:.0f}% | {tail} |"
        )
    results["seconds"] = time.perf_counter() - t_start
    if args.tiles_out:
        with open(args.tiles_out, "w") as f:
            json.dump(best_tiles, f, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
