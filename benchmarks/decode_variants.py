"""Candidate decode steps for batched generation, checked and timed in one run (one GPU, a few minutes).

    python benchmarks/decode_variants.py [--batches 8 32] [--budget-s 230] [--out FILE.json] [--profile]

Each variant is the engine (``notelab.lm.engine.Engine``: static cache, step compiled by inductor and captured in a
CUDA graph) built with injected parts (``VARIANTS``): how top-k / top-p find their threshold (``threshold``: the
pivot search of ``notelab.lm.nucleus``, the default on CUDA; bisection; a sort), how the token is taken (``draw``:
the split kernels of ``notelab.lm.nucleus``, the default; torch's ``gumbel_argmax``), the stacked step's attention
(``attention``: ``notelab.lm.attend.rope_attention``, the default; torch's ``rotated_attention``), how the layers
run (``layers``: ``FOLDED``, the RMSNorms folded into the projections, the default, every product by
``notelab.lm.skinny``; the same with every product by cuBLAS; ``STACKED``; programmatic dependent launch for the
products and the attention at every batch, at none, for the products only, for the attention only, where the default
takes it for the products and, at up to 8 rows, the attention) and how the step is compiled (``compiler``:
inductor's default; max-autotune). "torch parts" is the step as it was before the kernels (bisection,
``gumbel_argmax``, ``rotated_attention``). Llama-3.2-1B shape, random weights, bf16, P-token prompts, N new tokens,
no stop tokens; tokens/s of the second run (the first compiles and captures) and % of the batch roofline B x copy
bandwidth / (weight bytes + KV bytes a step reads at the mean context P + (N - 1) / 2), the definition of
``benchmarks/llama_gpu.py``; tokens compared with the default step's. Phases, each skipped once ``--budget-s`` has
passed:

  (0) the card's copy bandwidth; the model; with ``--profile``, the default step's kernels (or those of
      ``--profile-variants``) at each batch, greedy and sampled (torch.profiler over the captured graph's
      replays: the kernels by total time, their count a step, one step's kernels in order)
  (1) correctness, float32, a small Llama: the default step's greedy and sampled tokens and each threshold's
      sampled tokens equal the reference path's
  (2) at each batch: sampled (temperature 0.8, top-p 0.95, seed 0), then greedy, the default and each variant;
      max-autotune last, unless ``--no-autotune``

``--only REGEX``: only the phases whose names match. ``--tiny``: a small model and sizes, a smoke test of the
script on CPU. Earlier candidates measured by this script and removed (SDPA, inductor's sums of products, a
Triton attention a program per row and KV head, the chain's split-key attention kernel; a batched Triton decode
step, ``notelab.lm.chain_rows``; radix selection for the top-p threshold; the pivot search over float32 keys,
with 4,096 programs, with s = 3; the last split of the attention combining the others; the products computed
as the transposed problem or with rows padded to 16; programmatic dependent launch for inductor's kernels;
cuBLASLt products; inductor's coordinate-descent tuning, combo kernels and unsplit reductions; L2 prefetch
requests issued by the attention and SiLU-product kernels for the products after them; the pivot search in one
cooperative launch; a Triton kernel for the weight refresh; the attention's kernels and the products launched by
the compiled graph, as ``triton_op`` s; the token choice's kernels launching themselves, with or without
programmatic dependent launch) are in benchmarks/RESULTS.md;
``benchmarks/skinny_products.py`` times the products alone, every way.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from functools import partial

import torch

from decode_defaults import SAMPLED, Bench, Phases, agreement, timed
from notelab.lm import Llama, LlamaConfig, generate
from notelab.lm.attend import rope_attention
from notelab.lm.engine import STACKED, Engine, SamplingParams, StackedLayers, rotated_attention
from notelab.lm.folded import CUBLAS, WIDE_K, Products, folded_forward, folded_unsupported, folded_weights
from notelab.lm.nucleus import draw_tokens, pivot_threshold
from notelab.lm.sampling import bisect_threshold, filter_threshold, gumbel_argmax
from notelab.lm.skinny import (
    ADD_TILES,
    DOWN_TILES,
    GATED_TILES,
    LINEAR_TILES,
    QKV_TILES,
    Tiles,
    skinny_add_,
    skinny_gated,
    skinny_linear,
)


def folded_with(products: Products) -> StackedLayers:
    """The folded layers (the CUDA default) with ``products`` for their products."""
    return StackedLayers(folded_weights, partial(folded_forward, products=products), folded_unsupported)


def tuned_products(path: str) -> Products:
    """``notelab.lm.skinny``'s products with the tiles ``skinny_products.py --tiles-out`` found fastest per (N, K,
    B) (the default tiles of each for the shapes the file does not name)."""
    with open(path) as f:
        table = {(r["N"], r["K"], r["B"]): Tiles(*r["tiles"]) for r in json.load(f)}

    def pick(x: torch.Tensor, w: torch.Tensor, default: Tiles) -> Tiles:
        return table.get((w.shape[0], w.shape[1], x.shape[0]), default)

    return Products(
        lambda x, w: skinny_linear(x, w, pick(x, w, LINEAR_TILES)),
        lambda y, x, w: skinny_add_(y, x, w, pick(x, w, ADD_TILES)),
        lambda x, w, eps: skinny_gated(x, w, eps, pick(x, w, GATED_TILES)),
        lambda x, w: skinny_linear(x, w, pick(x, w, LINEAR_TILES)),
    )


def skinny_products(pdl: bool) -> Products:
    """The default products (every one by ``notelab.lm.skinny``), each kernel launched with programmatic dependent
    launch if ``pdl`` (the default: with it)."""

    def add_(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
        skinny_add_(y, x, w, DOWN_TILES if w.shape[1] > WIDE_K else ADD_TILES, pdl)

    return Products(partial(skinny_linear, tiles=QKV_TILES, pdl=pdl), add_, partial(skinny_gated, pdl=pdl),
                    partial(skinny_linear, pdl=pdl))  # fmt: skip


TORCH = dict(threshold=bisect_threshold, draw=gumbel_argmax, attention=rotated_attention)
VARIANTS: dict[str, dict | Callable[[int, Llama], dict]] = {  # a callable: the parts for (batch, model)
    "default": {},
    "torch parts": TORCH,
    "attention=torch": dict(attention=rotated_attention),
    # twice the programs, each reading 32 keys (the default reads 64)
    "attention blocks of 32": dict(attention=partial(rope_attention, block=32)),
    "draw=torch": dict(draw=gumbel_argmax),
    "threshold=bisect": dict(threshold=bisect_threshold),
    "threshold=sort": dict(threshold=filter_threshold),
    "threshold=pivot s=1": dict(threshold=partial(pivot_threshold, split_bits=1)),
    # eight / sixteen parts a pass: 6 / 4 passes over bf16 logits (16-bit keys), against the default's 8
    "threshold=pivot s=3": dict(threshold=partial(pivot_threshold, split_bits=3)),
    "threshold=pivot s=4": dict(threshold=partial(pivot_threshold, split_bits=4)),
    # fewer, longer programs a pass / more, shorter ones (the default aims at 512)
    "threshold=pivot 256 programs": dict(threshold=partial(pivot_threshold, programs=256)),
    "threshold=pivot 2048 programs": dict(threshold=partial(pivot_threshold, programs=2048, max_chunks=128)),
    # programs loading 2,048 logits at once (the default: 1,024): half the iterations, twice the loads in flight
    "threshold=pivot block 2048": dict(threshold=partial(pivot_threshold, block=2048)),
    "draw=block 2048": dict(draw=partial(draw_tokens, block=2048)),
    # the step before the RMSNorms were folded into the projections (notelab.lm.folded): RMSNorm and residual kernels
    "layers=stacked": dict(layers=STACKED),
    # every product by cuBLAS, the SiLU product its own kernel (the step before notelab.lm.skinny)
    "products=cublas": dict(layers=folded_with(CUBLAS)),
    # programmatic dependent launch for the products' and the attention's kernels at every batch / at none
    "pdl on": dict(layers=folded_with(skinny_products(True)), attention=partial(rope_attention, pdl=True)),
    "pdl off": dict(layers=folded_with(skinny_products(False)), attention=partial(rope_attention, pdl=False)),
    "pdl products only": dict(attention=partial(rope_attention, pdl=False)),
    "pdl attention only": dict(layers=folded_with(skinny_products(False)), attention=partial(rope_attention, pdl=True)),
    # inductor's Triton matmul templates benchmarked against cuBLAS per shape, pointwise epilogues fused into them
    "max-autotune": dict(
        compiler=partial(torch.compile, fullgraph=True, dynamic=False, mode="max-autotune-no-cudagraphs")
    ),
}
SAMPLED_ONLY = ("threshold=", "draw=")  # variants that change only sampled steps


def run_engine(engine: Engine, prompts: list[list[int]], n: int, sampled: bool) -> list[list[int]]:
    """Every prompt as a request of ``engine`` (row b seeded 0 + b, as ``generate`` does); their new tokens."""
    kw = dict(temperature=SAMPLED["temperature"], top_p=SAMPLED["top_p"]) if sampled else {}
    ids = {engine.add(p, SamplingParams(n, seed=SAMPLED["seed"] + b, **kw)): b for b, p in enumerate(prompts)}
    got: list[list[int]] = [[] for _ in prompts]
    while engine.has_work():
        for e in engine.step():
            if e.token is not None:
                got[ids[e.request_id]].append(e.token)
    return got


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama3.2-1b")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32], help="engine variants at these batches")
    p.add_argument("--budget-s", type=float, default=230.0, help="skip the phases that start after this long")
    p.add_argument("--no-autotune", action="store_true", help="skip the max-autotune compiler variant")
    p.add_argument("--tiny", action="store_true", help="small model and sizes: a CPU smoke test")
    p.add_argument("--out", help="write every figure as JSON here")
    p.add_argument("--only", help="run only the phases whose names match this regular expression")
    p.add_argument("--profile", action="store_true", help="profile the default step's kernels (CUDA)")
    p.add_argument("--profile-variants", nargs="+", default=["default"], help="with --profile: these variants' steps")
    p.add_argument("--skinny-tiles", help="skinny_products.py --tiles-out's JSON: adds 'products=skinny tuned'")
    args = p.parse_args(argv)
    if args.skinny_tiles:
        VARIANTS["products=skinny tuned"] = dict(layers=folded_with(tuned_products(args.skinny_tiles)))
    if args.tiny:
        args.preset, args.prompt, args.new_tokens, args.batches = "llama3-tiny", 8, 12, [2, 3]
    bench = Bench(args.preset, args.prompt, args.new_tokens, max(args.batches), args.tiny)
    device = bench.device
    shared: dict = {}
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# decode variants on {gpu}, torch {torch.__version__}, preset {args.preset}, P={args.prompt}, "
          f"N={args.new_tokens}, batches {args.batches}", flush=True)  # fmt: skip
    phase = Phases(args.budget_s, args.out, args.only)

    def correctness() -> dict:
        cfg = LlamaConfig(vocab_size=512, dim=256, n_layers=2, n_heads=8, n_kv_heads=2, multiple_of=32, max_seq_len=64)
        torch.manual_seed(0)
        with torch.device(device):
            small = Llama(cfg).eval()
        g = torch.Generator().manual_seed(2)
        prompts = [torch.randint(1, 512, (n,), generator=g).tolist() for n in (5, 9, 9, 13)]
        ref = generate(small, prompts, 16, path="reference")
        ref_s = generate(small, prompts, 16, path="reference", **SAMPLED)
        res = {}
        names = ("default", "threshold=bisect", "threshold=sort", "torch parts", "layers=stacked", "products=cublas")
        for name in names:
            parts = VARIANTS[name]
            parts = parts(len(prompts), small) if callable(parts) else parts
            eng = Engine(small, len(prompts), 32, stacked=True, **parts)
            res[f"{name} sampled == reference"] = run_engine(eng, prompts, 16, True) == ref_s
            if name in ("default", "torch parts", "layers=stacked", "products=cublas"):
                res[f"{name} greedy == reference"] = run_engine(eng, prompts, 16, False) == ref
        return res

    def variant(batch: int, name: str, sampled: bool) -> Callable[[], dict]:
        def run() -> dict:
            n, prompts = args.new_tokens, bench.prompts[:batch]
            parts = VARIANTS[name]
            parts = parts(batch, bench.model) if callable(parts) else parts
            eng = Engine(bench.model, batch, args.prompt + n, **parts)
            warm_s, _ = timed(device, lambda: run_engine(eng, prompts, n, sampled))
            dt, out = timed(device, lambda: run_engine(eng, prompts, n, sampled))
            res = {**bench.figures(batch, dt, out), "warmup_s": warm_s}
            key = ("sampled" if sampled else "greedy", batch)
            if key in shared:  # the default step's tokens, timed first
                res["rows_equal_default"], res["prefix_agree_default"] = agreement(out, shared[key])
            else:
                shared[key] = out
            return res

        return run

    def profiled(batch: int, sampled: bool, name: str) -> Callable[[], dict]:
        def run() -> dict:
            from torch.profiler import ProfilerActivity, profile

            n, prompts = 32, bench.prompts[:batch]
            parts = VARIANTS[name]
            parts = parts(batch, bench.model) if callable(parts) else parts
            eng = Engine(bench.model, batch, args.prompt + args.new_tokens, **parts)
            run_engine(eng, prompts, n, sampled)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                run_engine(eng, prompts, n, sampled)
                torch.cuda.synchronize()
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            steps = n - 1  # decode steps (the first token comes from the prefill)
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90))
            kernels.sort(key=lambda e: e.time_range.start)
            big = [i for i, e in enumerate(kernels) if e.time_range.elapsed_us() > 80]  # the output projection
            if len(big) >= 3:  # one whole step: from after one lm_head product to the next
                one = kernels[big[-3] + 1 : big[-2] + 1]
                print(f"# one step: {len(one)} kernels, first 40 in order (us, name):")
                for e in one[:40]:
                    print(f"  {e.time_range.elapsed_us():7.1f}  {e.name[:110]}")
                print("# ... its last 40:")
                for e in one[-40:]:
                    print(f"  {e.time_range.elapsed_us():7.1f}  {e.name[:110]}")
                span = one[-1].time_range.end - one[0].time_range.start
                busy = sum(e.time_range.elapsed_us() for e in one)
                return {"kernels_a_step": len(one), "kernel_us_a_step": busy, "span_us_a_step": span}
            return {"kernels": len(kernels), "steps": steps}

        return run

    phase("card", bench.card, always=True)
    phase("build bf16 model", bench.build, always=True)
    if bench.model is None:
        return 1
    print(
        "# roofline tokens/s: " + ", ".join(f"B={b}: {bench.roofline(b):.0f}" for b in [1, *args.batches]), flush=True
    )
    if args.profile and device.type == "cuda":  # first: where the step's time goes
        for name in args.profile_variants:
            for b in args.batches:
                for sampled in (False, True):
                    mode = "sampled" if sampled else "greedy"
                    phase(f"profile x{b} {mode} ({name})", profiled(b, sampled, name))
    phase("correctness float32 (small model)", correctness)
    for b in args.batches:  # the default step's tokens come first: the others are compared with them
        for mode in ("sampled", "greedy"):
            for name in VARIANTS:
                if name == "max-autotune" or (mode == "greedy" and name.startswith(SAMPLED_ONLY)):
                    continue
                phase(f"{mode} x{b} {name}", variant(b, name, mode == "sampled"))
    if not args.no_autotune:  # last: its compile (autotuning every product shape) is the longest
        for b in args.batches:
            phase(f"greedy x{b} max-autotune", variant(b, "max-autotune", False))
    phase.total()
    return 0


if __name__ == "__main__":
    sys.exit(main())
