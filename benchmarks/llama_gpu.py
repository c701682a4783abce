"""Llama-3.2-1B shape on one GPU: training MFU and batch-1 greedy decode, notelab against transformers.

Both models have the Llama-3.2-1B shape (1.24B parameters, tied embeddings, GQA 32/8, vocab
128,256), random weights (speed does not depend on them), and run in the same process:

(0) the card: bf16 matmul peak (TFLOP/s of large ``torch.mm``) and device copy bandwidth
    (``dst.copy_(src)`` of a multi-GB buffer, bytes read + written per second), both measured here;
(a) training at ``--batch`` x ``--seq`` (8 x 2048): fp32 master weights, bf16 autocast, fused AdamW,
    next-token cross-entropy. notelab eager and ``torch.compile``d (forward + loss), transformers
    ``LlamaForCausalLM`` with ``attn_implementation="sdpa"``. tokens/s, MFU = (6 N + 12 L d T) * tokens/s
    / measured peak (``notelab.lm.flops``), peak memory;
(b) batch-1 greedy decode in bf16 (``--prompt`` prompt tokens, ``--new-tokens`` new ones): notelab
    eager (dynamic cache); the general static-cache path (compiled step in CUDA graphs, sampling and
    host read-back outside them); the greedy fast path (the whole step, argmax and counter included,
    one CUDA graph replay per token, host read every ``--sync-every`` tokens) with the inductor step
    captured by hand, torch.compile's reduce-overhead, the eager step captured, and (``--max-autotune``)
    tuned GEMMs, each with the plain step and ("[fused ...]") with stacked [q; k; v] / [gate; up]
    weights and SDPA, matmul or sum-of-products attention; transformers ``generate`` eager and with
    its static cache + compiled forward. tokens/s against the HBM roofline, weight bytes / copy
    bandwidth (each token reads every weight once); for the fast path also the step's replays alone
    (no prefill, no host reads), and with ``--profile`` its kernels by device time.

Every phase is guarded: a failure prints its error and the others still run. A JSON with every
figure goes to ``--out``.

    python benchmarks/llama_gpu.py --out llama_gpu.json            # on the GPU (about 5 minutes)
    python benchmarks/llama_gpu.py --only decode --skip-hf --max-autotune   # decode only (about 4 minutes)
    python benchmarks/llama_gpu.py --only decode --skip-hf --sync-every 16 --kinds 'CUDA graph, |[fused'
    python benchmarks/llama_gpu.py --tiny --device cpu             # smoke test on CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import signal
import time
import traceback
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, NoReturn

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F

from notelab.lm import Llama, LlamaConfig, chain, generate
from notelab.lm.convert import config_to_hf, ours_to_hf
from notelab.lm.flops import count_parameters, flops_per_token, weight_bytes
from notelab.lm.generate import _GREEDY

if TYPE_CHECKING:
    from types import FrameType

    import transformers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clear(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def matmul_peak(device: torch.device, n: int, iters: int) -> float:
    """Measured bf16 matmul FLOP/s: best of a few timed batches of ``n x n @ n x n``."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    best = 0.0
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b)
        sync(device)
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - t0))
    return best


def copy_bandwidth(device: torch.device, nbytes: int, iters: int) -> float:
    """Measured device copy bandwidth in bytes/s, counting the bytes read and the bytes written."""
    src = torch.empty(nbytes // 2, device=device, dtype=torch.bfloat16).fill_(1.0)
    dst = torch.empty_like(src)
    best = 0.0
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            dst.copy_(src)
        sync(device)
        best = max(best, 2 * nbytes * iters / (time.perf_counter() - t0))
    return best


def hf_model(config: LlamaConfig, device: torch.device, dtype: torch.dtype) -> transformers.PreTrainedModel:
    import transformers

    cfg = transformers.LlamaConfig.from_dict(config_to_hf(config, dtype))
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    return model.to(dtype)


def copy_weights_to_hf(ours: Llama, hf: transformers.PreTrainedModel) -> None:
    state = {ours_to_hf(k): v for k, v in ours.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if [k for k in missing if "rotary" not in k] or unexpected:
        raise RuntimeError(f"weight copy to transformers failed: missing {missing[:3]}, unexpected {unexpected[:3]}")


def next_token_loss(model: torch.nn.Module, hf: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``loss(x, y)``: cross-entropy of the logits (upcast to fp32) against the next tokens."""

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=x).logits if hf else model(x)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    return loss


def train_run(
    step_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    params: Iterable[torch.nn.Parameter],
    device: torch.device,
    batch: int,
    seq: int,
    vocab: int,
    warmup: int,
    steps: int,
) -> dict:
    """Time ``steps`` optimizer steps (after ``warmup``) of next-token loss ``step_fn(x, y)``; fused AdamW."""
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=fused)
    g = torch.Generator(device=device).manual_seed(0)
    data = torch.randint(0, vocab, (batch, seq + 1), device=device, generator=g)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    losses = []
    t_compile = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t_warm = time.perf_counter() - t_compile
            t0 = time.perf_counter()
        with amp:
            loss = step_fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i in (0, warmup + steps - 1):
            losses.append(float(loss.detach()))
    sync(device)
    dt = time.perf_counter() - t0
    del opt
    return {"step_ms": 1e3 * dt / steps, "tokens_per_s": batch * seq * steps / dt, "warmup_s": t_warm, "loss": losses}


def _alarm(signum: int, frame: FrameType | None) -> NoReturn:
    raise TimeoutError("phase ran past --phase-timeout-s")


def phase(name: str, results: list, fn: Callable[[], dict], timeout_s: float = 0.0) -> None:
    """Run one guarded phase: its error (or a timeout, via SIGALRM) is recorded and the script goes on."""
    print(f"\n== {name}", flush=True)
    t0 = time.perf_counter()
    if timeout_s > 0 and hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(int(timeout_s))
    try:
        out = fn()
        out["name"] = name
        out["seconds"] = time.perf_counter() - t0
        results.append(out)
        print("   " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in out.items()))
    except Exception as e:  # one failed phase must not lose the others' figures
        traceback.print_exc()
        results.append({"name": name, "error": f"{type(e).__name__}: {e}"[:500]})
    finally:
        if timeout_s > 0 and hasattr(signal, "SIGALRM"):
            signal.alarm(0)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="llama3.2-1b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--skip-hf", action="store_true", help="skip the transformers phases")
    p.add_argument("--budget-s", type=float, default=380.0, help="skip the remaining phases past this wall time")
    p.add_argument("--phase-timeout-s", type=float, default=180.0, help="stop any one phase after this long")
    p.add_argument("--only", choices=["all", "train", "decode"], default="all", help="run only these phases")
    p.add_argument("--sync-every", type=int, nargs="+", default=[1, 16],
                   help="fast path host read-back intervals (tokens) to time; the last for others")  # fmt: skip
    p.add_argument("--kinds", default="",
                   help="decode: only the notelab kinds whose name has this ('a|b': either, a's first)")  # fmt: skip
    p.add_argument("--max-autotune", action="store_true", help="decode: also the max-autotune GEMM fast path")
    p.add_argument("--coordinate-descent", action="store_true", help="inductor coordinate-descent tuning (gpt-fast)")
    p.add_argument("--profile", action="store_true", help="decode: print the kernels of the fast path's step")
    p.add_argument("--tiny", action="store_true", help="a small model and sizes: a CPU smoke test of the script")
    p.add_argument("--out", default=None, help="write every figure as JSON here")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    # Each decode variant (mode, fused or not, attention) is one more compiled version of the same step function.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    if args.coordinate_descent:
        inductor_config.coordinate_descent_tuning = True
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    overrides = {}
    if args.tiny:
        args.preset, args.batch, args.seq, args.steps, args.warmup = "llama3-tiny", 2, 128, 2, 1
        args.prompt, args.new_tokens = 8, 16
        overrides = {"vocab_size": 1024}
    config = LlamaConfig.from_name(args.preset, **overrides)
    start = time.perf_counter()
    results: list[dict] = []
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "preset": args.preset,
        "params": count_parameters(config),
        "batch": args.batch,
        "seq": args.seq,
        "prompt": args.prompt,
        "new_tokens": args.new_tokens,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        args.skip_hf = True
    print(json.dumps(info))
    card: dict[str, float] = {}

    def over_budget() -> bool:
        return time.perf_counter() - start > args.budget_s

    # (0) the card
    def measure_card() -> dict[str, float]:
        n, iters, nbytes = (512, 5, 2**24) if args.tiny else (8192, 50, 2**32)
        card["peak_flops"] = matmul_peak(device, n, iters)
        card["copy_bytes_per_s"] = copy_bandwidth(device, nbytes, 5 if args.tiny else 20)
        clear(device)
        return {"peak_tflops": card["peak_flops"] / 1e12, "copy_gb_per_s": card["copy_bytes_per_s"] / 1e9}

    def run_phase(name: str, fn: Callable[[], dict], timeout_s: float = 0.0) -> None:
        phase(name, results, fn, timeout_s)
        save(args.out, info, card, results, start)  # after every phase: a later crash keeps these figures

    run_phase("card: bf16 matmul peak, copy bandwidth", measure_card)
    peak = card.get("peak_flops", float("nan"))
    fpt = flops_per_token(config, args.seq, training=True)

    def train(kind: str) -> Callable[[], dict]:
        def run() -> dict:
            clear(device)
            torch.manual_seed(0)
            if kind.startswith("notelab"):
                with torch.device(device):
                    model = Llama(config)
                fn = next_token_loss(model, hf=False)
                fn = torch.compile(fn, dynamic=False) if kind.endswith("compile") else fn
            else:
                model = hf_model(config, device, torch.float32)
                fn = next_token_loss(model, hf=True)
            model.train()
            out = train_run(fn, model.parameters(), device, args.batch, args.seq, config.vocab_size,
                            args.warmup, args.steps)  # fmt: skip
            out["mfu"] = fpt * out["tokens_per_s"] / peak
            out["peak_mem_gb"] = peak_memory_gb(device)
            model = fn = None
            clear(device)
            return out

        return run

    train_kinds = ["notelab eager"] + ([] if args.no_compile else ["notelab compile"])
    train_kinds += [] if args.skip_hf else ["transformers sdpa"]
    train_kinds = [] if args.only == "decode" else train_kinds
    for kind in train_kinds:
        if over_budget():
            results.append({"name": f"train {kind}", "error": "skipped: over the time budget"})
            continue
        run_phase(f"train {kind}", train(kind), args.phase_timeout_s)

    # (b) decode: one bf16 model shared by every variant
    shared: dict = {}

    def build_decode_models() -> dict[str, float]:
        clear(device)
        torch.manual_seed(0)
        with torch.device(device):
            ours = Llama(config)
        ours = ours.to(torch.bfloat16).eval()
        shared["ours"] = ours
        g = torch.Generator().manual_seed(1)
        shared["prompt"] = torch.randint(1, config.vocab_size, (1, args.prompt), generator=g).to(device)
        if not args.skip_hf:
            hf = hf_model(config, device, torch.bfloat16).eval()
            copy_weights_to_hf(ours, hf)
            hf.generation_config.eos_token_id = None  # random weights: never stop early
            hf.generation_config.pad_token_id = 0
            shared["hf"] = hf
        wb = weight_bytes(ours)
        shared["roofline"] = card.get("copy_bytes_per_s", float("nan")) / wb
        return {"weight_gb": wb / 1e9, "roofline_tokens_per_s": shared["roofline"]}

    if args.only != "train":
        run_phase("decode: build bf16 models, HBM roofline", build_decode_models)

    def timed(fn: Callable[[], list[int]]) -> tuple[float, list[int]]:
        sync(device)
        t0 = time.perf_counter()
        tokens = fn()
        sync(device)
        return time.perf_counter() - t0, tokens

    # notelab variants: generate() keyword arguments. "greedy graph" kinds are the fast path (one CUDA graph
    # replay per token, host read every k tokens); "general path" is the per-token loop with ops outside the graph.
    ours_kinds = {
        "notelab eager": {},
        "notelab compiled static, general path": {"compile": True, "fast_greedy": False},
    }
    last = args.sync_every[-1]
    if not args.no_compile:
        for k in args.sync_every:
            ours_kinds[f"notelab greedy graph: inductor + CUDA graph, sync {k}"] = {"compile": True, "sync_every": k}
    ours_kinds[f"notelab greedy graph: eager + CUDA graph, sync {last}"] = {"static": True, "sync_every": last}
    # The whole step as notelab.lm.chain's Triton kernels, with programmatic dependent launch (PDL) or without,
    # and other chain options (tile sizes, launch order, splits), for tuning: generate() with decode_matvec="chain".
    chain_kw = {"static": True, "sync_every": last, "decode_matvec": "chain"}
    chain_variants = {
        "": {},
        ", late launch": {"early_launch": False},
        ", no PDL": {"pdl": False},
        ", tiles 4K/4w": {"tile_elems": 4096},
        ", tiles 8K/2w": {"warps": 2},
        ", tiles 16K/4w": {"tile_elems": 16384},
        ", lm 8/SM": {"lm_programs_per_sm": 8},
        ", attn block 32": {"attn_block": 32},
        ", attn block 128": {"attn_block": 128},
        ", split 128 keys": {"split_keys": 128},
    }
    for name, how in chain_variants.items():
        ours_kinds[f"notelab greedy graph: Triton chain{name}, sync {last}"] = {**chain_kw, "chain": how}
    if not args.no_compile:
        ours_kinds[f"notelab greedy graph: compile reduce-overhead, sync {last}"] = {
            "compile": "reduce-overhead",
            "sync_every": last,
        }
    if args.max_autotune:  # Triton GEMM templates tuned per shape against cuBLAS (minutes of compiling)
        ours_kinds[f"notelab greedy graph: max-autotune GEMMs + CUDA graph, sync {last}"] = {
            "compile": "max-autotune-no-cudagraphs",
            "sync_every": last,
        }
    # The kinds above are the plain step (fuse=False, SDPA); these multiply by stacked [q; k; v] and [gate; up]
    # weights ("fused"), and may replace SDPA by float32 matmuls or sums of products ("matmul" / "reduce attn").
    # generate()'s defaults are fused, with "reduce" attention when compiled.
    plain = {k: v for k, v in ours_kinds.items() if "greedy graph" in k and "chain" not in v}
    for k, v in plain.items():
        v.update(fuse=False, decode_attention="sdpa", decode_matvec="cublas")
        if "reduce-overhead" in k or (not args.no_compile and "eager" in k) or f"sync {last}" not in k:
            continue
        head = k.removesuffix(f", sync {last}")
        ours_kinds[f"{head} [fused], sync {last}"] = {**v, "fuse": True, "decode_attention": "sdpa"}
        for attn in ("matmul", "reduce") if "eager" not in k else ("matmul",):
            ours_kinds[f"{head} [fused, {attn} attn], sync {last}"] = {**v, "fuse": True, "decode_attention": attn}
        if "inductor" in k:  # the layers' products as inductor reductions, or as notelab.lm.kernels launches
            for matvec in ("reduce", "triton"):
                ours_kinds[f"{head} [fused, reduce attn, {matvec} matvec], sync {last}"] = {
                    **v,
                    "fuse": True,
                    "decode_attention": "reduce",
                    "decode_matvec": matvec,
                }
    if args.no_compile:
        ours_kinds.pop("notelab compiled static, general path")
    if args.kinds:
        # in the order of the patterns, so that the variants that matter most run first
        ours_kinds = {k: v for w in args.kinds.split("|") for k, v in ours_kinds.items() if w in k}

    def decode(kind: str) -> Callable[[], dict]:
        def run() -> dict:
            ours, prompt, n = shared["ours"], shared["prompt"], args.new_tokens
            if kind in ours_kinds:
                kw = dict(ours_kinds[kind])
                if "chain" in kw:  # the module default the chain reads when it is built: a new state per kind
                    chain.OPTIONS = chain.ChainOptions(**kw.pop("chain"))
                    _GREEDY.pop(ours, None)
                fn = lambda m: generate(ours, prompt, m, **kw)[0]  # noqa: E731

                static = bool(kw)
            elif kind == "notelab compiled static, no CUDA graphs":
                fn = lambda m: generate(ours, prompt, m, compile="default", fast_greedy=False)[0]  # noqa: E731
                static = True
            else:
                hf = shared["hf"]
                kw = {}
                if kind == "transformers static compiled":
                    kw = {"cache_implementation": "static"}
                    hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)
                P = prompt.shape[1]

                def fn(m: int) -> list[int]:
                    out = hf.generate(prompt, max_new_tokens=m, do_sample=False, **kw)
                    return out[0, P:].tolist()

                static = "compiled" in kind

            # Warm up (compile, record CUDA graphs, fill the allocator); static kinds need the timed shapes.
            warm_s, _ = timed(lambda: fn(n if static else min(n, 16)))
            dt, tokens = timed(lambda: fn(n))
            shared.setdefault("tokens", {})[kind] = tokens
            tps = len(tokens) / dt
            out = {"tokens_per_s": tps, "roofline_fraction": tps / shared["roofline"], "warmup_s": warm_s}
            if "greedy graph" in kind:
                out["replay_tokens_per_s"] = replay_only(ours, prompt.shape[1], n)
                if args.profile and device.type == "cuda":
                    profile_replay(ours)
            return out

        return run

    @torch.inference_mode()
    def profile_replay(ours: Llama, n: int = 20) -> None:
        """Print the kernels of ``n`` decode-step replays, by total device time (from slot 0: stays in range)."""
        from torch.profiler import ProfilerActivity, profile

        state = _GREEDY[ours][1]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                state.slot.fill_(0)
                state.step(ours)
            sync(device)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90))

    @torch.inference_mode()  # the fast path's buffers are inference tensors
    def replay_only(ours: Llama, P: int, n: int) -> float:
        """Tokens/s of the fast path's decode step alone: n - 1 replays, no prefill and no host reads."""
        state = _GREEDY[ours][1]
        dt = float("inf")
        for _ in range(3):
            state.slot.fill_(P)  # replays advance the slot; from P they stay inside the cache
            sync(device)
            t0 = time.perf_counter()
            for _ in range(n - 1):
                state.step(ours)
            sync(device)
            dt = min(dt, time.perf_counter() - t0)
        return (n - 1) / dt

    decode_kinds = list(ours_kinds) if args.only != "train" else []
    decode_kinds += [] if args.skip_hf or args.only == "train" else ["transformers eager"]
    decode_kinds += [] if args.skip_hf or args.no_compile or args.only == "train" else ["transformers static compiled"]
    for kind in decode_kinds:
        if "ours" not in shared:
            break
        if over_budget():
            results.append({"name": f"decode {kind}", "error": "skipped: over the time budget"})
            continue
        run_phase(f"decode {kind}", decode(kind), args.phase_timeout_s)
        if kind == "notelab compiled static, general path" and "error" in results[-1] and not over_budget():
            fallback = "notelab compiled static, no CUDA graphs"  # the compiled step without CUDA graphs
            run_phase(f"decode {fallback}", decode(fallback), args.phase_timeout_s)
    toks = shared.get("tokens", {})
    if toks:  # against notelab eager, else against the first kind run
        first = "notelab eager" if "notelab eager" in toks else next(iter(toks))
        info["greedy_tokens_equal_to"] = first
        info["greedy_tokens_equal"] = {k: v == toks[first] for k, v in toks.items()}
        # bf16 rounding differs between kinds, so near-ties can flip: how many leading tokens agree
        info["greedy_tokens_common_prefix"] = {
            k: next((i for i, (a, b) in enumerate(zip(v, toks[first])) if a != b), min(len(v), len(toks[first])))
            for k, v in toks.items()
        }

    print_table(info, card, results)
    return save(args.out, info, card, results, start)


def save(out: str | None, info: dict, card: dict, results: list[dict], start: float) -> dict:
    report = {"info": info, "card": card, "results": results, "seconds": time.perf_counter() - start}
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=2)
    return report


def print_table(info: dict, card: dict, results: list[dict]) -> None:
    print(f"\n# {info['preset']} ({info['params'] / 1e9:.3f}B params) on {info['device']}, torch {info['torch']}, "
          f"transformers {info.get('transformers', '-')}")  # fmt: skip
    if card:
        print(f"# measured bf16 matmul peak {card['peak_flops'] / 1e12:.0f} TFLOP/s, "
              f"copy bandwidth {card['copy_bytes_per_s'] / 1e9:.0f} GB/s")  # fmt: skip
    print(f"# train: B={info['batch']} x T={info['seq']}, bf16 autocast, fused AdamW, MFU vs the measured peak")
    print(f"# decode: batch 1 greedy, P={info['prompt']}, N={info['new_tokens']}, bf16, fraction of the HBM roofline")
    print(f"| {'run':<84} | {'tokens/s':>10} | {'MFU / roofline':>14} | {'peak GB':>7} |")
    print(f"|{'-' * 86}|{'-' * 12}|{'-' * 16}|{'-' * 9}|")
    for r in results:
        if "error" in r:
            print(f"| {r['name'][:84]:<84} | {'failed':>10} | {r['error'][:14]:>14} | {'':>7} |")
        elif "tokens_per_s" in r:
            frac = r.get("mfu", r.get("roofline_fraction"))
            mem = r.get("peak_mem_gb")
            mem_s = f"{mem:7.1f}" if mem is not None else f"{'-':>7}"
            print(f"| {r['name'][:84]:<84} | {r['tokens_per_s']:>10.1f} | {100 * frac:>13.1f}% | {mem_s} |")
            if "replay_tokens_per_s" in r and "roofline_fraction" in r:
                rep = r["replay_tokens_per_s"]
                rf = rep / r["tokens_per_s"] * r["roofline_fraction"]
                print(f"| {'  (decode step replay alone)':<84} | {rep:>10.1f} | {100 * rf:>13.1f}% | {'-':>7} |")
    if "greedy_tokens_equal" in info:
        print(f"# greedy tokens equal to {info['greedy_tokens_equal_to']}: {info['greedy_tokens_equal']}")
        print(f"# leading tokens in common with it: {info['greedy_tokens_common_prefix']}")


if __name__ == "__main__":
    main()
