"""Fused matrix-vector kernel (``notelab.lm.kernels.fused_matvec``) against torch, at Llama-3.2-1B decode shapes.

Batch-1 decoding reads every weight once per token, so each projection is bound by memory bandwidth. For
the four projections of a Llama-3.2-1B layer at M = 1 in bf16:

    qkv      N = 3072,  K = 2048   y = W RMSNorm(x)
    o_proj   N = 2048,  K = 2048   y = W x + r
    gate_up  N = 16384, K = 2048   y = W RMSNorm(x)
    down     N = 2048,  K = 8192   y = W (SiLU(g) * u) + r

it measures, after a check of the fused kernel against ``fused_matvec_reference`` (max abs error):

(0) the card's copy bandwidth: a large device-to-device copy, bytes read + written per second;
(1) ``fused_matvec`` (one Triton kernel, autotuned first; its chosen config is printed);
(2) the unfused torch sequence it replaces (``RMSNorm`` module + ``F.linear``; ``F.silu(g) * u`` +
    ``F.linear``; ``+ r``), eager kernels;
(3) ``F.linear`` alone on a ready input (cuBLAS's matrix-vector product, no elementwise work);
(4) with ``--compile``: (1) and (2) under ``torch.compile(fullgraph=True)`` (inductor; the fused op is a
    ``triton_op``, so inductor sees its kernel).

Timing: ``--calls`` calls (default 100) are captured in one CUDA graph and the graph is replayed ``--iters``
times between CUDA events, so launch overhead does not count; us per call = elapsed / (iters x calls).
Successive calls cycle through copies of the weight that together exceed ``--rotate-mb`` (default 512 MB,
10x the H200's L2), so that weights come from HBM as in a real decode step (the same 8 MB matrix read 100
times in a row would be served from L2). GB/s = the bytes the fused op must move (weight + x + norm weight
+ residual + output) / time, for every variant (an effective bandwidth), and its fraction of the copy
bandwidth. A last line sums each variant over the four shapes (one layer's projections).

Under the interpreter (``--tiny``) bf16 errors are up to a few ulps larger than on the GPU: the interpreter
rounds float32 -> bfloat16 toward zero where the GPU rounds to nearest.

    python benchmarks/gemv_gpu.py                                # on the GPU (a minute or two, autotuning included)
    python benchmarks/gemv_gpu.py --compile                      # also the torch.compile'd variants
    TRITON_INTERPRET=1 python benchmarks/gemv_gpu.py --tiny      # smoke test on CPU through Triton's interpreter
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from notelab.core.norms import RMSNorm


@dataclass(frozen=True)
class Shape:
    name: str
    N: int
    K: int
    norm: bool = False
    silu_mul: bool = False
    residual: bool = False


DECODE_SHAPES = (
    Shape("qkv", 3072, 2048, norm=True),
    Shape("o_proj", 2048, 2048, residual=True),
    Shape("gate_up", 16384, 2048, norm=True),
    Shape("down", 2048, 8192, silu_mul=True, residual=True),
)
TINY_SHAPES = (
    Shape("qkv", 40, 48, norm=True),
    Shape("o_proj", 24, 40, residual=True),
    Shape("gate_up", 72, 48, norm=True),
    Shape("down", 24, 72, silu_mul=True, residual=True),
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int, iters: int) -> float:
    """Device copy bandwidth in bytes/s (bytes read + bytes written), best of three timed batches."""
    src = torch.ones(nbytes // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = 0.0
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            dst.copy_(src)
        sync(device)
        best = max(best, 2 * nbytes * iters / (time.perf_counter() - t0))
    return best


def time_per_call(fn: Callable[[int], torch.Tensor], device: torch.device, calls: int, iters: int) -> float:
    """Seconds per ``fn(i)``: on CUDA, ``calls`` calls captured in a CUDA graph replayed ``iters`` times.

    ``fn`` is run a few times first, outside the capture (autotuning, compilation, cuBLAS set-up)."""
    if device.type != "cuda":  # the interpreter smoke test: plain wall-clock
        fn(0)
        t0 = time.perf_counter()
        for i in range(iters):
            fn(i)
        return (time.perf_counter() - t0) / iters
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for i in range(3):
            fn(i)
    torch.cuda.current_stream(device).wait_stream(side)
    sync(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    sync(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    sync(device)
    return start.elapsed_time(end) / 1e3 / (iters * calls)


def fused_bytes(shape: Shape, dtype: torch.dtype) -> int:
    """The bytes the fused op must move: weight, input, norm weight, residual, output."""
    size = torch.empty((), dtype=dtype).element_size()
    n = shape.N * shape.K + (2 if shape.silu_mul else 1) * shape.K + shape.N
    n += shape.K if shape.norm else 0
    n += shape.N if shape.residual else 0
    return n * size


def make_variants(
    shape: Shape, device: torch.device, dtype: torch.dtype, rotate_bytes: int, compile_: bool
) -> tuple[dict[str, Callable[[int], torch.Tensor]], Callable[[], tuple[torch.Tensor, torch.Tensor]]]:
    """The timed callables (argument: call index, picks the weight copy) and a fused-vs-reference check."""
    from notelab.lm.kernels import fused_matvec, fused_matvec_reference

    gen = torch.Generator(device="cpu").manual_seed(0)
    w_bytes = shape.N * shape.K * torch.empty((), dtype=dtype).element_size()
    copies = max(1, math.ceil(rotate_bytes / w_bytes))
    w0 = (torch.randn(shape.N, shape.K, generator=gen) / shape.K**0.5).to(device, dtype)
    ws = [w0] + [w0.clone() for _ in range(copies - 1)]
    x = torch.randn(1, (2 if shape.silu_mul else 1) * shape.K, generator=gen).to(device, dtype)
    g = (1 + 0.1 * torch.randn(shape.K, generator=gen)).to(device, dtype) if shape.norm else None
    r = torch.randn(1, shape.N, generator=gen).to(device, dtype) if shape.residual else None
    kw = {"norm_weight": g, "silu_mul": shape.silu_mul, "residual": r}
    norm = RMSNorm(shape.K).to(device, dtype)
    if g is not None:
        with torch.no_grad():
            norm.weight.copy_(g)
    ready = torch.randn(1, shape.K, generator=gen).to(device, dtype)  # F.linear's input, already transformed

    def fused(w: torch.Tensor) -> torch.Tensor:
        return fused_matvec(x, w, **kw)

    def unfused(w: torch.Tensor) -> torch.Tensor:
        if shape.norm:
            inp = norm(x)
        elif shape.silu_mul:
            gate, up = x.chunk(2, dim=-1)
            inp = F.silu(gate) * up
        else:
            inp = x
        y = F.linear(inp, w)
        return y if r is None else r + y

    def linear(w: torch.Tensor) -> torch.Tensor:
        return F.linear(ready, w)

    variants: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "fused_matvec": fused,
        "unfused torch": unfused,
        "F.linear alone": linear,
    }
    if compile_:
        variants["fused_matvec, compiled"] = torch.compile(fused, fullgraph=True)
        variants["unfused torch, compiled"] = torch.compile(unfused, fullgraph=True)

    def check() -> tuple[torch.Tensor, torch.Tensor]:
        return fused_matvec(x, w0, **kw), fused_matvec_reference(x, w0, **kw)

    timed = {name: (lambda i, f=f: f(ws[i % len(ws)])) for name, f in variants.items()}
    return timed, check


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    p.add_argument("--iters", type=int, default=None, help="graph replays per variant (default 50; 2 with --tiny)")
    p.add_argument("--calls", type=int, default=100, help="calls captured in each CUDA graph")
    p.add_argument("--rotate-mb", type=float, default=512.0, help="weight copies cycled through, in MB in all")
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd variants")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU through Triton's interpreter")
    args = p.parse_args(argv)
    if args.tiny:  # must be set before triton.jit runs, i.e. before notelab.lm.kernels is imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from notelab.lm.kernels import last_autotune_config, triton_available

    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    iters = args.iters or (2 if args.tiny else 50)
    shapes = TINY_SHAPES if args.tiny else DECODE_SHAPES
    dtype = torch.bfloat16
    compile_ = args.compile and not args.tiny  # the interpreter's kernel cannot be traced
    card = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"torch {torch.__version__}, device {device}{card}")
    try:
        import triton

        print(f"triton {triton.__version__}, kernel available: {triton_available()}")
    except ImportError:
        print("triton not installed: fused_matvec runs its torch reference")

    copy_bps = copy_bandwidth(device, (1 << 20) if args.tiny else (4 << 30), 3 if args.tiny else 20)
    print(f"copy bandwidth: {copy_bps / 1e9:,.0f} GB/s (device-to-device copy, read + write)\n")

    rows: list[tuple[str, float, str, float]] = []
    configs: dict[str, str | None] = {}
    for shape in shapes:
        nbytes = fused_bytes(shape, dtype)
        try:
            rotate = 0 if args.tiny else int(args.rotate_mb * 1e6)  # one weight copy suffices for the smoke test
            timed, check = make_variants(shape, device, dtype, rotate, compile_)
            out, ref = check()
            configs[shape.name] = last_autotune_config()
            err = (out.float() - ref.float()).abs().max().item()
            print(f"{shape.name}: max |fused - reference| = {err:.3g} (max |reference| {ref.abs().max().item():.3g})")
            for name, fn in timed.items():
                try:
                    t = time_per_call(fn, device, args.calls, iters)
                    rows.append((shape.name, nbytes, name, t))
                except Exception:  # one variant's failure must not stop the others
                    print(f"{shape.name} / {name} failed:\n{traceback.format_exc()}", file=sys.stderr)
        except Exception:
            print(f"{shape.name} failed:\n{traceback.format_exc()}", file=sys.stderr)

    how = (
        f"{args.calls} calls per CUDA graph x {iters} replays"
        if device.type == "cuda"
        else f"{iters} calls, wall clock"
    )
    print(f"\nM = 1, {dtype}, {how}\n")
    print("| shape | MB moved | kernel | us / call | GB/s | of copy bandwidth |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for name, nbytes, kind, t in rows:
        gbps = nbytes / t / 1e9
        print(f"| {name} | {nbytes / 1e6:.2f} | {kind} | {t * 1e6:.2f} | {gbps:,.0f} | {gbps / (copy_bps / 1e9):.1%} |")
    done = {name for name, *_ in rows}
    ideal = sum(fused_bytes(shape, dtype) for shape in shapes if shape.name in done) / copy_bps
    print(f"\nper layer ({', '.join(sorted(done))}): at copy bandwidth {ideal * 1e6:.2f} us", end="")
    for kind in dict.fromkeys(kind for _, _, kind, _ in rows):
        per = [t for name, _, k, t in rows if k == kind]
        if len(per) == len(done):
            print(f"; {kind} {sum(per) * 1e6:.2f} us", end="")
    print("\n\nautotune config chosen for fused_matvec (eager):")
    for name, cfg in configs.items():
        print(f"  {name}: {cfg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
