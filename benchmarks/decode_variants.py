"""Candidate decode steps for batched generation, checked and timed in one run (one GPU, a few minutes).

    python benchmarks/decode_variants.py [--batches 8 32] [--budget-s 240] [--out FILE.json]

Each variant is the engine (``notelab.lm.engine.Engine``: static cache, step compiled by inductor and captured
in a CUDA graph) built with injected parts: the attention over the cache (``attend``: SDPA, the default
before this script; ``decode_attention_sums``; ``decode_attention_bmm``; the Triton kernel
``notelab.lm.chain.batched_decode_attention``) and, for sampling, how top-p finds its
threshold (``threshold``: a sort, ``filter_threshold``; bisection, ``bisect_threshold``). Phases, in order,
each skipped once ``--budget-s`` has passed:

  (0) the card's copy bandwidth (``llama_gpu.copy_bandwidth``, bytes read + written per second)
  (1) correctness, float32, a small Llama: every variant's greedy tokens equal the reference path's
      (``generate(..., path="reference")``), and sampled tokens (seeded) too
  (2) Llama-3.2-1B shape, random weights, bf16, P-token prompts, N new tokens, no stop tokens: each variant,
      greedy, at each batch: tokens/s (second run; the first compiles and captures) and % of the batch roofline
      B x copy bandwidth / (weight bytes + KV bytes a step reads at the mean context P + (N - 1) / 2), the
      definition of ``benchmarks/llama_gpu.py``; agreement of its tokens with the bf16 reference path's
  (3) sampled (temperature 0.8, top-p 0.95, seed 0): the default step, and the fastest greedy attention with
      each threshold
  (4) ``generate(model, [prompt], N)`` with its defaults at batch 1 (the chain), greedy and sampled
  (5) ``notelab lm generate`` (the CLI, default options but ``--max-new-tokens N``) on a run folder of the same
      model saved in bf16 with a 128,256-token tokenizer, and the tokens/s it prints
  (6) greedy with the fastest attention compiled by inductor's max-autotune (``compiler``), at each batch

``--tiny``: a small model and sizes, a smoke test of the script on CPU.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from llama_gpu import copy_bandwidth, kv_bytes_per_step, sync
from notelab.core.attention import attention
from notelab.lm import Llama, LlamaConfig, generate
from notelab.lm.chain import batched_decode_attention
from notelab.lm.engine import Engine, SamplingParams, compile_step, decode_attention_bmm, decode_attention_sums
from notelab.lm.flops import weight_bytes
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
    "max-autotune": lambda fn: torch.compile(fn, fullgraph=True, dynamic=False, mode="max-autotune-no-cudagraphs"),
}
SAMPLED = {"temperature": 0.8, "top_p": 0.95, "seed": 0}


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


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    """(share of rows equal in full, mean share of each row before its first difference)."""
    same = sum(x == y for x, y in zip(a, b)) / len(a)
    prefix = []
    for x, y in zip(a, b):
        k = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
        prefix.append(k / max(len(x), 1))
    return same, sum(prefix) / len(prefix)


def write_run_folder(model: Llama, folder: Path) -> None:
    """``model`` (bf16) and a tokenizer with one entry per vocabulary id (a small BPE, padded with named ids), so
    the CLI can decode whatever random weights generate."""
    from tokenizers import Tokenizer as HFTokenizer

    from notelab.data.tokenizer import Tokenizer

    small = Tokenizer.train(["The quick brown fox. Jumps over the lazy dog!\n"] * 20, vocab_size=300)
    spec = json.loads(small.backend.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(small.vocab_size, model.config.vocab_size):
        vocab[f"<{i}>"] = i
    Tokenizer(HFTokenizer.from_str(json.dumps(spec))).save(folder)
    model.save_pretrained(folder)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama3.2-1b")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32], help="engine variants at these batches")
    p.add_argument("--attention", nargs="+", choices=list(ATTENTION), default=list(ATTENTION))
    p.add_argument("--budget-s", type=float, default=230.0, help="skip the phases that start after this long")
    p.add_argument("--no-cli", action="store_true")
    p.add_argument("--no-autotune", action="store_true", help="skip the max-autotune compiler variant")
    p.add_argument("--tiny", action="store_true", help="small model and sizes: a CPU smoke test")
    p.add_argument("--out", help="write every figure as JSON here")
    args = p.parse_args(argv)
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        args.preset, args.prompt, args.new_tokens, args.batches = "llama3-tiny", 8, 12, [2, 3]
    if device.type != "cuda":
        args.attention = [a for a in args.attention if a != "triton"]
    results: dict[str, dict] = {}
    shared: dict = {}
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# decode variants on {gpu}, torch {torch.__version__}, preset {args.preset}, P={args.prompt}, "
          f"N={args.new_tokens}, batches {args.batches}", flush=True)  # fmt: skip

    def phase(name: str, fn: Callable[[], dict]) -> None:
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            print(f"{name}: skipped (budget: {elapsed:.0f} s > {args.budget_s:.0f} s)", flush=True)
            return
        t0 = time.perf_counter()
        try:
            res = fn()
        except Exception as e:  # noqa: BLE001 - one failed phase must not lose the others' figures
            traceback.print_exc()
            res = {"error": f"{type(e).__name__}: {e}"}
        res["phase_s"] = round(time.perf_counter() - t0, 1)
        results[name] = res
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items())
        print(f"{name}: {shown}", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))

    def timed(fn: Callable[[], list[list[int]]]) -> tuple[float, list[list[int]]]:
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        return time.perf_counter() - t0, out

    def card() -> dict:
        nbytes, iters = (2**24, 3) if args.tiny else (2**32, 20)
        shared["bw"] = copy_bandwidth(device, nbytes, iters)
        return {"copy_GB_per_s": shared["bw"] / 1e9}

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

    def build() -> dict:
        config = LlamaConfig.from_name(args.preset)
        torch.manual_seed(0)
        with torch.device(device):
            model = Llama(config)
        shared["model"] = model.to(torch.bfloat16).eval()
        shared["weight_bytes"] = weight_bytes(model)
        g = torch.Generator().manual_seed(1)
        shared["prompts"] = torch.randint(1, config.vocab_size, (max(args.batches), args.prompt), generator=g).tolist()
        return {"weight_GB": shared["weight_bytes"] / 1e9}

    def roofline(batch: int) -> float:
        kv = kv_bytes_per_step(shared["model"].config, batch, args.prompt + (args.new_tokens - 1) / 2)
        return batch * shared["bw"] / (shared["weight_bytes"] + kv)

    def figures(batch: int, seconds: float, out: list[list[int]]) -> dict:
        tps = sum(len(r) for r in out) / seconds
        return {"tokens_per_s": tps, "of_roofline_%": 100 * tps / roofline(batch)}

    def reference(batch: int) -> dict:
        _, out = timed(lambda: generate(shared["model"], shared["prompts"][:batch], args.new_tokens, path="reference"))
        shared[("ref", batch)] = out
        return {}

    def variant(
        batch: int, attend: str, threshold: str, sampled: bool, compiler: str = "default"
    ) -> Callable[[], dict]:
        def run() -> dict:
            model, n, prompts = shared["model"], args.new_tokens, shared["prompts"][:batch]
            parts = dict(attend=ATTENTION[attend], threshold=THRESHOLD[threshold], compiler=COMPILER[compiler])
            eng = Engine(model, batch, args.prompt + n, **parts)
            warm_s, _ = timed(lambda: run_engine(eng, prompts, n, sampled))
            dt, out = timed(lambda: run_engine(eng, prompts, n, sampled))
            res = {**figures(batch, dt, out), "warmup_s": warm_s}
            key = ("sampled" if sampled else "greedy", batch)
            if not sampled and ("ref", batch) in shared:
                res["rows_equal_ref"], res["prefix_agree_ref"] = agreement(out, shared[("ref", batch)])
            if key in shared:  # the default step's tokens, timed first
                res["rows_equal_default"], res["prefix_agree_default"] = agreement(out, shared[key])
            else:
                shared[key] = out
            if compiler == "default":
                shared.setdefault("speed", {})[(attend, threshold, sampled, batch)] = res["tokens_per_s"]
            return res

        return run

    def public(batch: int, sampled: bool) -> Callable[[], dict]:
        def run() -> dict:
            kw = SAMPLED if sampled else {}
            prompts = shared["prompts"][:batch]
            warm_s, _ = timed(lambda: generate(shared["model"], prompts, args.new_tokens, **kw))
            dt, out = timed(lambda: generate(shared["model"], prompts, args.new_tokens, **kw))
            return {**figures(batch, dt, out), "warmup_s": warm_s}

        return run

    def cli() -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "run"
            write_run_folder(shared["model"], folder)
            shared.pop("model")  # the CLI process loads its own copy
            torch.cuda.empty_cache() if device.type == "cuda" else None
            ids = ",".join(str(t % 300) for t in shared["prompts"][0])
            # the installed `notelab` command, run by this interpreter (whatever environment it is in)
            code = "import sys; from notelab.cli import main; sys.exit(main())"
            cmd = [sys.executable, "-c", code, "lm", "generate", "--checkpoint", str(folder), "--prompt-ids", ids,
                   "--max-new-tokens", str(args.new_tokens)]  # fmt: skip
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            wall = time.perf_counter() - t0
        line = [ln for ln in done.stderr.splitlines() if "tok/s" in ln]
        if done.returncode or not line:
            return {"error": f"exit {done.returncode}: {done.stderr[-400:]}"}
        rates = [float(x) for x in re.findall(r"([\d.]+) tok/s", line[-1])]
        res = {"printed": line[-1], "process_wall_s": wall, "whole_call_tok_s": rates[0]}
        if len(rates) > 1:
            res["after_two_steps_tok_s"] = rates[1]
            res["after_two_steps_of_roofline_%"] = 100 * rates[1] / shared["roofline1"]
        return res

    phase("card", card)
    phase("correctness float32 (small model)", correctness)
    phase("build bf16 model", build)
    if "model" not in shared:
        return 1
    shared["roofline1"] = roofline(1)
    print("# roofline tokens/s: " + ", ".join(f"B={b}: {roofline(b):.0f}" for b in [1, *args.batches]), flush=True)
    for b in args.batches:
        phase(f"bf16 reference path x{b} (greedy tokens)", lambda b=b: reference(b))
    for b in args.batches:
        for name in args.attention:  # sdpa first: its tokens are the default's
            phase(f"greedy x{b} attend={name}", variant(b, name, "sort", False))
    speeds = shared.get("speed", {})
    best = {
        b: max(args.attention, key=lambda a, b=b: speeds.get((a, "sort", False, b), 0.0)) for b in args.batches
    }  # fmt: skip
    for b in args.batches:
        phase(f"sampled x{b} attend=sdpa threshold=sort (default)", variant(b, "sdpa", "sort", True))
        for th in THRESHOLD:
            if (best[b], th) != ("sdpa", "sort"):
                phase(f"sampled x{b} attend={best[b]} threshold={th}", variant(b, best[b], th, True))
    phase("generate() defaults x1 greedy", public(1, False))
    phase("generate() defaults x1 sampled", public(1, True))
    if not args.no_cli:
        phase("notelab lm generate (CLI) x1 greedy", cli)
        if "model" not in shared:
            phase("rebuild bf16 model", build)
    if not args.no_autotune:  # last: its compile (autotuning every product shape) is the longest
        for b in args.batches:
            phase(
                f"greedy x{b} attend={best[b]} compiler=max-autotune",
                variant(b, best[b], "sort", False, "max-autotune"),
            )
    print(f"# total {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
