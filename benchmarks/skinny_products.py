"""The batched decode step's products on their own: which way of computing them reads the weights fastest?

    python benchmarks/skinny_products.py [--batches 8 32] [--out FILE.json]     # one GPU, a few minutes
    python benchmarks/skinny_products.py --tiny                                  # CPU, Triton's interpreter

At batch B (8-32 rows, one token each) a decode step multiplies the rows ``x`` ``(B, K)`` by every weight
``W`` ``(N, K)`` of the model once: ``y = x W^T``, bound by reading ``W``. In the engine's compiled step on an
H200 (benchmarks/RESULTS.md, the batch-8 profile) [gate; up] reaches 88% of the copy bandwidth but down_proj
61% and [q; k; v] / o_proj 35-50%; at those three at 85%, the batch-8 step would be ~0.16 ms (12%) shorter,
past the issue's 50% of the roofline. A batched decode step as Triton kernels (tensor-core tiles with the
norms, RoPE and residuals fused) measured slower than the default as a whole (RESULTS, 2026-11-30); this
script times the products alone, each way:

- ``x W^T``: ``torch.matmul(x, W.t())``, cuBLAS, what ``F.linear`` and the engine do; the same with cuBLASLt
- ``(W x^T)^T``: the transposed problem (N x K times K x B), which cuBLAS tiles differently
- ``x`` padded to 16 / 64 rows: the tile heights cuBLAS's tensor-core kernels are built for
- split-K by hand: ``S`` batched products over K / S each, then a sum (more blocks for small N)
- a Triton kernel: tensor-core tiles (``tl.dot``, rows padded to ``BM`` >= 16), ``BN`` weight rows per
  program, ``K`` in chunks of ``BK`` pipelined over ``STAGES``, optionally split over ``K`` (float32 atomics)

Every product of the Llama-3.2-1B shape (stacked [q; k; v], o, stacked [gate; up], down; 16 layers, so the
weights do not stay in the 50 MB L2 between calls) and the output projection, in bf16, each timed as 16
products (one per layer's copy; the output projection once) captured in a CUDA graph and replayed, in
microseconds a product and % of the copy bandwidth measured in the same run. Each way's result is checked
against ``F.linear`` in float32 first.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the script needs triton
    triton = tl = None

SHAPES = {  # Llama-3.2-1B: (N, K) of each product, how many copies a step reads; the largest first
    "gate_up": (16384, 2048, 16),
    "down": (2048, 8192, 16),
    "lm_head": (128256, 2048, 1),
    "qkv": (3072, 2048, 16),
    "o": (2048, 2048, 16),
}
CONFIGS = [  # (BN, BK, STAGES, WARPS, SPLIT): 16 per product and batch, a few minutes in all
    (bn, bk, 4, 4, split)
    for bn, bk, split in itertools.product((32, 64, 128), (64, 128, 256), (1, 2))
    if bn * bk <= 16384
]

if triton is not None:

    @triton.jit
    def _skinny_kernel(  # noqa: ANN202
        x_ptr,  # noqa: ANN001  (B, K)
        w_ptr,  # noqa: ANN001  (N, K) row-major
        y_ptr,  # noqa: ANN001  (B, N): x's dtype (SPLIT == 1) or float32, zeroed (SPLIT > 1)
        B,  # noqa: ANN001
        N,  # noqa: ANN001
        K: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
        SPLIT: tl.constexpr,
    ):
        pid_n, pid_k = tl.program_id(0), tl.program_id(1)
        rm = tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        span: tl.constexpr = K // SPLIT
        for k0 in range(pid_k * span, pid_k * span + span, BK):
            rk = k0 + tl.arange(0, BK)
            xt = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=rm[:, None] < B, other=0.0)
            wt = tl.load(
                w_ptr + rn.to(tl.int64)[:, None] * K + rk[None, :], mask=rn[:, None] < N, other=0.0,
                eviction_policy="evict_first",
            )  # fmt: skip
            acc += tl.dot(xt, tl.trans(wt))
        mask = (rm[:, None] < B) & (rn[None, :] < N)
        ptrs = y_ptr + rm[:, None] * N + rn[None, :]
        if SPLIT == 1:
            tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")


def skinny(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, cfg: tuple[int, ...]) -> torch.Tensor:
    """``out = x w^T`` by the Triton kernel with ``cfg = (BN, BK, STAGES, WARPS, SPLIT)`` (``out`` float32 and
    zeroed by the caller when SPLIT > 1)."""
    bn, bk, stages, warps, split = cfg
    B, K = x.shape
    N = w.shape[0]
    bm = max(16, triton.next_power_of_2(B))
    grid = (triton.cdiv(N, bn), split)
    _skinny_kernel[grid](x, w, out, B, N, K=K, BM=bm, BN=bn, BK=bk, SPLIT=split, num_warps=warps, num_stages=stages)
    return out


def products(x: torch.Tensor, ws: list[torch.Tensor], outs: list[torch.Tensor], cfg: tuple[int, ...] | None) -> None:
    """``x w^T`` for every copy ``w`` into ``outs``: by cuBLAS (``cfg`` None) or by the kernel (float32 ``outs``,
    zeroed first, when the configuration splits K)."""
    for w, o in zip(ws, outs):
        if cfg is None:
            torch.matmul(x, w.t(), out=o)
        else:
            if cfg[4] > 1:
                o.zero_()
            skinny(x, w, o, cfg)


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
    "x W^T": (lambda x: x, lambda x, w: torch.matmul(x, w.t()), False),
    "x W^T, cuBLASLt": (lambda x: x, lambda x, w: torch.matmul(x, w.t()), True),
    "(W x^T)^T": (lambda x: x.t().contiguous(), lambda xt, w: torch.matmul(w, xt).t(), False),
    "x padded to 16 rows": (_padded(16), lambda x, w: torch.matmul(x, w.t()), False),
    "x padded to 64 rows": (_padded(64), lambda x, w: torch.matmul(x, w.t()), False),
    "split-K 2": (lambda x: x, lambda x, w: _split_k(x, w, 2), False),
    "split-K 4": (lambda x: x, lambda x, w: _split_k(x, w, 4), False),
}


def torch_way(name: str, x: torch.Tensor, ws: list[torch.Tensor]) -> tuple[float, float]:
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


def fits(shape: tuple[int, int], cfg: tuple[int, ...]) -> bool:
    N, K = shape
    bn, bk, _, _, split = cfg
    return K % (split * bk) == 0 and N >= bn


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


def check(x: torch.Tensor, w: torch.Tensor, cfg: tuple[int, ...]) -> float:
    """Largest relative error of the kernel against ``F.linear`` (float32 reference)."""
    out = torch.zeros(x.shape[0], w.shape[0], dtype=torch.float32 if cfg[4] > 1 else x.dtype, device=x.device)
    got = skinny(x, w, out, cfg).float()
    want = F.linear(x.float(), w.float())
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-30))


def tiny() -> int:
    """Interpreter smoke test: every split / tile path against F.linear on small shapes."""
    torch.manual_seed(0)
    for B, (N, K), cfg in [(3, (40, 64), (32, 32, 1, 4, 1)), (8, (64, 128), (32, 32, 1, 4, 2)),
                           (17, (96, 64), (64, 16, 1, 4, 4))]:  # fmt: skip
        x, w = torch.randn(B, K), torch.randn(N, K)
        err = check(x, w, cfg)
        print(f"B={B} N={N} K={K} cfg={cfg}: max relative error {err:.2e}")
        if err > 1e-4:
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--budget-s", type=float, default=200.0, help="skip the configurations past this long")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test through TRITON_INTERPRET=1")
    p.add_argument("--out", help="JSON of every figure")
    args = p.parse_args(argv)
    if triton is None:
        print("needs triton")
        return 1
    if args.tiny:
        return tiny()
    dev = torch.device("cuda")
    t_start = time.perf_counter()
    bw = copy_bandwidth(dev)
    print(f"# {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, triton {triton.__version__}; "
          f"copy bandwidth {bw / 1e9:,.0f} GB/s", flush=True)  # fmt: skip
    results: dict = {"copy_GB_per_s": bw / 1e9, "rows": []}
    for name in args.shapes:
        N, K, copies = SHAPES[name]
        torch.manual_seed(0)
        ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        nbytes = N * K * 2
        for B in args.batches:
            x = torch.randn(B, K, device=dev, dtype=torch.bfloat16)
            outs = [torch.empty(B, N, device=dev, dtype=torch.bfloat16) for _ in ws]
            accs = [torch.zeros(B, N, device=dev, dtype=torch.float32) for _ in ws]

            t = graph_time(lambda x=x, ws=ws, outs=outs: products(x, ws, outs, None)) / copies
            row = {"product": name, "N": N, "K": K, "B": B, "cublas_us": t * 1e6, "cublas_%": 100 * nbytes / t / bw}
            row["ways"] = {}
            for way in WAYS:
                if way.startswith("split-K") and K % int(way.split()[-1]):
                    continue
                try:
                    err, tw = torch_way(way, x, ws)
                except Exception as e:  # noqa: BLE001 - a way that fails is reported, the others go on
                    print(f"  {name} B={B} {way}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    continue
                row["ways"][way] = {"us": tw * 1e6, "%": 100 * nbytes / tw / bw, "relative_error": err}
            best = None
            for cfg in CONFIGS:
                if not fits((N, K), cfg) or time.perf_counter() - t_start > args.budget_s:
                    continue
                try:
                    err = check(x, ws[0], cfg)
                    if err > 2e-2:
                        print(f"  {name} B={B} {cfg}: wrong (relative error {err:.1e})", flush=True)
                        continue
                    bufs = accs if cfg[4] > 1 else outs
                    tt = graph_time(lambda x=x, ws=ws, bufs=bufs, cfg=cfg: products(x, ws, bufs, cfg)) / copies
                except Exception as e:  # noqa: BLE001 - a configuration that does not compile is skipped
                    print(f"  {name} B={B} {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    continue
                if best is None or tt < best[1]:
                    best = (cfg, tt)
            if best is not None:
                row.update(triton_cfg=best[0], triton_us=best[1] * 1e6, triton_pct=100 * nbytes / best[1] / bw)
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    print("\n| product | N x K | B | cuBLAS x W^T: us, % of copy bw | fastest other way | us | % |")
    print("| --- | --- | ---: | ---: | --- | ---: | ---: |")
    for r in results["rows"]:
        others = {k: v["us"] for k, v in r["ways"].items() if k != "x W^T" and v["relative_error"] < 2e-2}
        if "triton_us" in r:
            others[f"Triton {r['triton_cfg']}"] = r["triton_us"]
        tail = "- | - | -"
        if others:
            best = min(others, key=others.get)
            pct = 100 * r["N"] * r["K"] * 2 / (others[best] * 1e-6) / (results["copy_GB_per_s"] * 1e9)
            tail = f"{best} | {others[best]:.1f} | {pct:.0f}%"
        print(f"| {r['product']} | {r['N']} x {r['K']} | {r['B']} | {r['cublas_us']:.1f}, {r['cublas_%']:.0f}% | "
              f"{tail} |")  # fmt: skip
    results["seconds"] = time.perf_counter() - t_start
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
