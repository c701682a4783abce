"""Candidate decode steps for batched generation, checked and timed in one run (one GPU, a few minutes).

    python benchmarks/decode_variants.py [--batches 8 32] [--budget-s 230] [--out FILE.json]

Each variant is the engine (``notelab.lm.engine.Engine``: static cache, step compiled by inductor and captured
in a CUDA graph) built with injected parts: the attention over the cache (``attend``: SDPA, the default
before this script; ``decode_attention_sums``; ``decode_attention_bmm``; the Triton kernel
``notelab.lm.chain.batched_decode_attention``) and, for sampling, how top-p finds its
threshold (``threshold``: a sort, ``filter_threshold``; bisection, ``bisect_threshold``) and how the step is
compiled (``compiler``). Llama-3.2-1B shape, random weights, bf16, P-token prompts, N new tokens, no stop
tokens; tokens/s of the second run (the first compiles and captures) and % of the batch roofline
B x copy bandwidth / (weight bytes + KV bytes a step reads at the mean context P + (N - 1) / 2), the
definition of ``benchmarks/llama_gpu.py``; bf16 tokens compared with the reference path's
(``generate(..., path="reference")``, greedy) and with the default step's. Phases, most informative first,
each skipped once ``--budget-s`` has passed:

  (0) the card's copy bandwidth; the model; the reference path's bf16 greedy tokens at each batch
  (1) greedy, first batch: every attention (sdpa = the default step); the fastest is "best"; best with
      inductor's programmatic dependent launch (``triton.enable_pdl``, where this torch has it); best with
      the products from cuBLASLt (``torch.backends.cuda.preferred_blas_library``)
  (2) at each batch: greedy sdpa and best (other batches), sampled (temperature 0.8, top-p 0.95, seed 0) with
      the default step and with best + bisection
  (3) correctness, float32, a small Llama: each attention's greedy tokens and each threshold's sampled tokens
      equal the reference path's
  (4) ``generate(model, [prompt], N)`` with its defaults at batch 1 (the chain), greedy and sampled; then
      ``notelab lm generate`` (the CLI, default options but ``--max-new-tokens N``) on a run folder of the
      same model saved in bf16, and the tokens/s it prints
  (5) the rest: best + sort sampled (the threshold's share alone), the other attentions at the other batches,
      PDL at the other batches, best compiled by inductor's max-autotune

``--tiny``: a small model and sizes, a smoke test of the script on CPU.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial

import torch
import torch._inductor.config

from decode_defaults import SAMPLED, Bench, Phases, agreement, time_cli, timed
from notelab.core.attention import attention
from notelab.lm import Llama, LlamaConfig, generate
from notelab.lm.chain import batched_decode_attention
from notelab.lm.engine import Engine, SamplingParams, compile_step, decode_attention_bmm, decode_attention_sums
from notelab.lm.sampling import bisect_threshold, filter_threshold

ATTENTION = {
    "sdpa": attention,
    "triton": batched_decode_attention,  # CUDA only: reads each row's visible keys, not the whole static cache
    "sums": decode_attention_sums,
    "bmm": decode_attention_bmm,
}
THRESHOLD = {"sort": filter_threshold, "bisect": bisect_threshold}
COMPILER = {
    "default": compile_step,
    # inductor's Triton matmul templates benchmarked against cuBLAS per shape, pointwise epilogues fused into them
    "max-autotune": partial(torch.compile, fullgraph=True, dynamic=False, mode="max-autotune-no-cudagraphs"),
    # inductor's Triton kernels with programmatic dependent launch (Hopper): each may start before the previous
    # one ends (the chain's trick, for the generated kernels); a distinct backend, so dynamo compiles anew
    "pdl": partial(torch.compile, fullgraph=True, dynamic=False, options={"triton.enable_pdl": True}),
}


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
    p.add_argument("--attention", nargs="+", choices=list(ATTENTION), default=["sdpa", "triton", "sums"])
    p.add_argument("--budget-s", type=float, default=230.0, help="skip the phases that start after this long")
    p.add_argument("--no-cli", action="store_true")
    p.add_argument("--no-autotune", action="store_true", help="skip the max-autotune compiler variant")
    p.add_argument("--tiny", action="store_true", help="small model and sizes: a CPU smoke test")
    p.add_argument("--out", help="write every figure as JSON here")
    args = p.parse_args(argv)
    if args.tiny:
        args.preset, args.prompt, args.new_tokens, args.batches = "llama3-tiny", 8, 12, [2, 3]
    bench = Bench(args.preset, args.prompt, args.new_tokens, max(args.batches), args.tiny)
    device = bench.device
    if device.type != "cuda":
        args.attention = [a for a in args.attention if a != "triton"]
    shared: dict = {}
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# decode variants on {gpu}, torch {torch.__version__}, preset {args.preset}, P={args.prompt}, "
          f"N={args.new_tokens}, batches {args.batches}", flush=True)  # fmt: skip
    phase = Phases(args.budget_s, args.out)

    def correctness() -> dict:
        cfg = LlamaConfig(vocab_size=512, dim=128, n_layers=2, n_heads=8, n_kv_heads=2, multiple_of=32, max_seq_len=64)
        torch.manual_seed(0)
        with torch.device(device):
            small = Llama(cfg).eval()
        g = torch.Generator().manual_seed(2)
        prompts = [torch.randint(1, 512, (n,), generator=g).tolist() for n in (5, 9, 9, 13)]
        ref = generate(small, prompts, 16, path="reference")
        ref_s = generate(small, prompts, 16, path="reference", **SAMPLED)
        res = {}
        for name in args.attention:  # greedy: each attention
            eng = Engine(small, len(prompts), 32, stacked=True, attend=ATTENTION[name])
            res[f"{name} greedy == reference"] = run_engine(eng, prompts, 16, False) == ref
        for th in THRESHOLD:  # sampled: each threshold (the attention is the same arithmetic as in greedy)
            eng = Engine(small, len(prompts), 32, stacked=True, threshold=THRESHOLD[th])
            res[f"{th} sampled == reference"] = run_engine(eng, prompts, 16, True) == ref_s
        return res

    def reference(batch: int) -> dict:
        shared[("ref", batch)] = generate(bench.model, bench.prompts[:batch], args.new_tokens, path="reference")
        return {}

    def variant(
        batch: int, attend: str, threshold: str, sampled: bool, compiler: str = "default", blas: str | None = None
    ) -> Callable[[], dict]:
        def run() -> dict:
            n, prompts = args.new_tokens, bench.prompts[:batch]
            parts = dict(attend=ATTENTION[attend], threshold=THRESHOLD[threshold], compiler=COMPILER[compiler])
            eng = Engine(bench.model, batch, args.prompt + n, **parts)
            before = torch.backends.cuda.preferred_blas_library()
            try:  # the products' library is chosen when the graph is captured (first run); replays keep it
                if blas is not None:
                    torch.backends.cuda.preferred_blas_library(blas)
                warm_s, _ = timed(device, lambda: run_engine(eng, prompts, n, sampled))
                dt, out = timed(device, lambda: run_engine(eng, prompts, n, sampled))
            finally:
                torch.backends.cuda.preferred_blas_library(before)
            res = {**bench.figures(batch, dt, out), "warmup_s": warm_s}
            key = ("sampled" if sampled else "greedy", batch)
            if not sampled and ("ref", batch) in shared:
                res["rows_equal_ref"], res["prefix_agree_ref"] = agreement(out, shared[("ref", batch)])
            if key in shared:  # the default step's tokens, timed first
                res["rows_equal_default"], res["prefix_agree_default"] = agreement(out, shared[key])
            else:
                shared[key] = out
            if compiler == "default" and blas is None:
                shared.setdefault("speed", {})[(attend, threshold, sampled, batch)] = res["tokens_per_s"]
            return res

        return run

    def public(batch: int, sampled: bool) -> Callable[[], dict]:
        def run() -> dict:
            kw = SAMPLED if sampled else {}
            prompts = bench.prompts[:batch]
            warm_s, _ = timed(device, lambda: generate(bench.model, prompts, args.new_tokens, **kw))
            dt, out = timed(device, lambda: generate(bench.model, prompts, args.new_tokens, **kw))
            return {**bench.figures(batch, dt, out), "warmup_s": warm_s}

        return run

    phase("card", bench.card)
    phase("build bf16 model", bench.build)
    if bench.model is None:
        return 1
    print(
        "# roofline tokens/s: " + ", ".join(f"B={b}: {bench.roofline(b):.0f}" for b in [1, *args.batches]), flush=True
    )
    for b in args.batches:
        phase(f"bf16 reference path x{b} (greedy tokens)", lambda b=b: reference(b))
    # Most informative first (phases past the budget are skipped): every attention at the first batch, the
    # fastest of them against the default at the others, greedy and sampled; then the rest.
    first, rest = args.batches[0], args.batches[1:]
    for name in args.attention:  # sdpa first: its tokens are the default's
        phase(f"greedy x{first} attend={name}", variant(first, name, "sort", False))
    speeds = shared.get("speed", {})
    best = max(args.attention, key=lambda a: speeds.get((a, "sort", False, first), 0.0))
    print(f"# fastest attention at batch {first}: {best}", flush=True)
    if hasattr(torch._inductor.config.triton, "enable_pdl"):
        phase(f"greedy x{first} attend={best} compiler=pdl", variant(first, best, "sort", False, "pdl"))
    if device.type == "cuda":  # no new compile: the same step, its products captured from cuBLASLt
        phase(f"greedy x{first} attend={best} blas=cublaslt", variant(first, best, "sort", False, blas="cublaslt"))
    for b in args.batches:
        if b != first:
            phase(f"greedy x{b} attend=sdpa", variant(b, "sdpa", "sort", False))
            if best != "sdpa":
                phase(f"greedy x{b} attend={best}", variant(b, best, "sort", False))
        phase(f"sampled x{b} attend=sdpa threshold=sort (default)", variant(b, "sdpa", "sort", True))
        phase(f"sampled x{b} attend={best} threshold=bisect", variant(b, best, "bisect", True))
    phase("correctness float32 (small model)", correctness)
    phase("generate() defaults x1 greedy", public(1, False))
    phase("generate() defaults x1 sampled", public(1, True))
    if not args.no_cli:
        phase("notelab lm generate (CLI) x1 greedy",
              lambda: time_cli(bench.model, bench.prompts[0], args.new_tokens, bench.roofline(1)))  # fmt: skip
    for b in args.batches:  # the threshold alone: the fastest attention with the sort
        if best != "sdpa":
            phase(f"sampled x{b} attend={best} threshold=sort", variant(b, best, "sort", True))
    for b in rest:
        for name in args.attention:
            if name not in ("sdpa", best):
                phase(f"greedy x{b} attend={name}", variant(b, name, "sort", False))
        if hasattr(torch._inductor.config.triton, "enable_pdl"):
            phase(f"greedy x{b} attend={best} compiler=pdl", variant(b, best, "sort", False, "pdl"))
    if not args.no_autotune:  # last: its compile (autotuning every product shape) is the longest
        for b in args.batches:
            phase(f"greedy x{b} attend={best} compiler=max-autotune", variant(b, best, "sort", False, "max-autotune"))
    phase.total()
    return 0


if __name__ == "__main__":
    sys.exit(main())
