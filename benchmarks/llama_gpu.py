"""Llama-3.2-1B shape on one GPU: decoding through the public ``notelab.lm.generate`` with default arguments,
beside transformers' ``generate`` in the same run. (Training: ``benchmarks/llama_train_gpu.py``.)

Both models have the Llama-3.2-1B shape (1.24B parameters, tied embeddings, GQA 32/8, vocab 128,256),
random weights (speed does not depend on them), bf16, and run in the same process:

(0) the card: device copy bandwidth (``dst.copy_(src)`` of a multi-GB buffer, bytes read + written per
    second), measured here;
(a) for each batch (``--batches``, default 1, 8, 32) of ``--prompt``-token prompts and ``--new-tokens`` new
    tokens: ``generate(model, prompts, N)`` (greedy) and ``generate(model, prompts, N, temperature=0.8,
    top_p=0.95)`` (sampled), each once to warm up (compile, capture) and once timed; no stop tokens, so
    every row gets N tokens. tokens/s = B N / seconds, against the roofline
    B x copy bandwidth / (weight bytes + KV-cache bytes a step must read), the KV bytes at the mean
    context P + (N - 1) / 2 (each step reads every weight once and every row's cache so far);
(b) with ``--variants B``: ``notelab.lm.engine.Engine`` driven directly at batch B, greedy, with its step's
    variants (plain or stacked projections, inductor's coordinate-descent tuning), ``--profile``: kernels;
(c) transformers ``generate`` (eager, its default dynamic cache, SDPA) on the same weights and prompts, for
    the batches in ``--hf-batches``.

Every phase is guarded: a failure prints its error and the others still run. A JSON with every figure goes to
``--out``.

    python benchmarks/llama_gpu.py --out llama_gpu.json          # on the GPU
    python benchmarks/llama_gpu.py --tiny --device cpu           # smoke test on CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

import torch

from notelab.lm import Llama, LlamaConfig, generate
from notelab.lm.convert import config_to_hf, ours_to_hf
from notelab.lm.engine import Engine, SamplingParams
from notelab.lm.flops import count_parameters, weight_bytes

if TYPE_CHECKING:
    from types import FrameType

    import transformers

SAMPLED = {"temperature": 0.8, "top_p": 0.95}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def kv_bytes_per_step(config: LlamaConfig, batch: int, context: float, dtype_bytes: int = 2) -> float:
    """Bytes of keys and values one decode step must read: every layer, every row, ``context`` slots."""
    c = config
    return batch * c.n_layers * 2 * c.n_kv_heads * c.head_dim * context * dtype_bytes


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
    print(flush=True)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="llama3.2-1b")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--modes", nargs="+", choices=["greedy", "sampled"], default=["greedy", "sampled"])
    p.add_argument("--hf-batches", type=int, nargs="*", default=[1, 8, 32], help="transformers for these batches")
    p.add_argument("--profile", action="store_true", help="print the kernels of one more run of each variant")
    p.add_argument("--variants", type=int, default=0, help="at this batch (greedy): the engine's step variants")
    p.add_argument("--phase-timeout-s", type=float, default=240.0, help="stop any one phase after this long")
    p.add_argument("--tiny", action="store_true", help="a small model and sizes: a CPU smoke test of the script")
    p.add_argument("--out", default=None, help="write every figure as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    overrides = {}
    if args.tiny:
        args.preset, args.prompt, args.new_tokens = "llama3-tiny", 8, 16
        overrides = {"vocab_size": 1024}
    config = LlamaConfig.from_name(args.preset, **overrides)
    start = time.perf_counter()
    results: list[dict] = []
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "preset": args.preset,
        "params": count_parameters(config),
        "prompt": args.prompt,
        "new_tokens": args.new_tokens,
        "date": time.strftime("%Y-%m-%d"),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        args.hf_batches = []
    print(json.dumps(info), flush=True)
    card: dict[str, float] = {}
    shared: dict = {}

    def run_phase(name: str, fn: Callable[[], dict]) -> None:
        phase(name, results, fn, args.phase_timeout_s)
        save(args.out, info, card, results, start)  # after every phase: a later crash keeps these figures

    def measure_card() -> dict[str, float]:
        nbytes, iters = (2**24, 5) if args.tiny else (2**32, 20)
        card["copy_bytes_per_s"] = copy_bandwidth(device, nbytes, iters)
        return {"copy_gb_per_s": card["copy_bytes_per_s"] / 1e9}

    def build() -> dict[str, float]:
        torch.manual_seed(0)
        with torch.device(device):
            ours = Llama(config)
        shared["ours"] = ours.to(torch.bfloat16).eval()
        if args.hf_batches:
            hf = hf_model(config, device, torch.bfloat16).eval()
            copy_weights_to_hf(shared["ours"], hf)
            hf.generation_config.eos_token_id = None  # random weights: never stop early
            hf.generation_config.pad_token_id = 0
            shared["hf"] = hf
        g = torch.Generator().manual_seed(1)
        shared["prompts"] = torch.randint(1, config.vocab_size, (max(args.batches), args.prompt), generator=g)
        shared["weight_bytes"] = weight_bytes(shared["ours"])
        return {"weight_gb": shared["weight_bytes"] / 1e9}

    run_phase("card: copy bandwidth", measure_card)
    run_phase("build bf16 models", build)
    if "ours" not in shared:
        return save(args.out, info, card, results, start)
    n, P = args.new_tokens, args.prompt

    def roofline(batch: int) -> float:
        step_bytes = shared["weight_bytes"] + kv_bytes_per_step(config, batch, P + (n - 1) / 2)
        return batch * card.get("copy_bytes_per_s", float("nan")) / step_bytes

    def timed(fn: Callable[[], list[list[int]]]) -> tuple[float, list[list[int]]]:
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        return time.perf_counter() - t0, out

    def ours_case(batch: int, mode: str) -> Callable[[], dict]:
        def run() -> dict:
            ours = shared["ours"]
            prompts = shared["prompts"][:batch].tolist()
            kw = dict(SAMPLED, seed=0) if mode == "sampled" else {}
            warm_s, _ = timed(lambda: generate(ours, prompts, n, **kw))  # compile, capture: the timed shapes
            dt, out = timed(lambda: generate(ours, prompts, n, **kw))
            shared.setdefault("tokens", {})[f"notelab {mode} x{batch}"] = out
            tokens = sum(len(r) for r in out)
            tps = tokens / dt
            res = {"tokens_per_s": tps, "roofline_tokens_per_s": roofline(batch), "warmup_s": warm_s}
            res["roofline_fraction"] = tps / res["roofline_tokens_per_s"]
            res["tokens"] = tokens
            return res

        return run

    def variant(batch: int, stacked: bool, tuned: bool) -> Callable[[], dict]:
        """The engine directly (its step with or without stacked projections, inductor's coordinate-descent
        tuning on or off): greedy, one run to compile and capture, one timed."""

        def run() -> dict:
            import torch._inductor.config as inductor_config

            torch._dynamo.reset()  # compile again under this configuration
            inductor_config.coordinate_descent_tuning = tuned
            try:
                engine = Engine(shared["ours"], batch, P + n, stacked=stacked)
                prompts = shared["prompts"][:batch].tolist()

                def go() -> list[list[int]]:
                    ids = [engine.add(r, SamplingParams(max_new_tokens=n)) for r in prompts]
                    got: dict[int, list[int]] = {i: [] for i in ids}
                    while engine.has_work():
                        for e in engine.step():
                            if e.token is not None:
                                got[e.request_id].append(e.token)
                    return list(got.values())

                warm_s, _ = timed(go)
                dt, out = timed(go)
                if args.profile and device.type == "cuda":
                    from torch.profiler import ProfilerActivity, profile

                    with profile(activities=[ProfilerActivity.CUDA]) as prof:
                        go()
                        sync(device)
                    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=70)
                    print(table)
            finally:
                inductor_config.coordinate_descent_tuning = False
                torch._dynamo.reset()
            tps = sum(len(r) for r in out) / dt
            return {"tokens_per_s": tps, "roofline_fraction": tps / roofline(batch), "warmup_s": warm_s}

        return run

    def hf_case(batch: int, mode: str) -> Callable[[], dict]:
        def run() -> dict:
            hf = shared["hf"]
            prompts = shared["prompts"][:batch].to(device)
            kw = dict(SAMPLED, do_sample=True, top_k=None) if mode == "sampled" else dict(do_sample=False)

            def fn(m: int) -> list[list[int]]:
                return hf.generate(prompts, max_new_tokens=m, min_new_tokens=m, **kw)[:, P:].tolist()

            warm_s, _ = timed(lambda: fn(8))
            dt, out = timed(lambda: fn(n))
            tokens = sum(len(r) for r in out)
            tps = tokens / dt
            return {"tokens_per_s": tps, "roofline_fraction": tps / roofline(batch), "warmup_s": warm_s}

        return run

    for batch in args.batches:
        for mode in args.modes:
            run_phase(f"notelab generate, batch {batch}, {mode}", ours_case(batch, mode))
    if args.variants:
        for stacked, tuned in ((False, False), (True, True)):
            name = f"engine, batch {args.variants}, greedy, {'stacked' if stacked else 'plain'} projections"
            run_phase(f"{name}{', tuned' if tuned else ''}", variant(args.variants, stacked, tuned))
    for batch in args.hf_batches:
        for mode in args.modes:
            run_phase(f"transformers generate, batch {batch}, {mode}", hf_case(batch, mode))
    toks = shared.get("tokens", {})
    if "notelab greedy x1" in toks:  # bf16: rows of a batch against the same prompt alone (near-ties can flip)
        alone = toks["notelab greedy x1"][0]
        info["greedy_row0_common_prefix_with_batch1"] = {
            k: next((i for i, (a, b) in enumerate(zip(v[0], alone)) if a != b), len(alone))
            for k, v in toks.items()
            if "greedy" in k
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
          f"transformers {info.get('transformers', '-')}, {info['date']}")  # fmt: skip
    if card:
        print(f"# copy bandwidth {card['copy_bytes_per_s'] / 1e9:.0f} GB/s")
    print(f"# decode: P={info['prompt']}, N={info['new_tokens']}, bf16; roofline = B x copy bandwidth / "
          "(weight + KV bytes a step)")  # fmt: skip
    print(f"| {'run':<50} | {'tokens/s':>10} | {'of roofline':>11} | {'warm-up s':>9} |")
    print(f"|{'-' * 52}|{'-' * 12}|{'-' * 13}|{'-' * 11}|")
    for r in results:
        if "error" in r:
            print(f"| {r['name'][:50]:<50} | {'failed':>10} | {r['error'][:11]:>11} | {'':>9} |")
        elif "tokens_per_s" in r:
            frac, warm = r["roofline_fraction"], r.get("warmup_s", float("nan"))
            print(f"| {r['name'][:50]:<50} | {r['tokens_per_s']:>10.1f} | {100 * frac:>10.1f}% | {warm:>9.1f} |")
    if "greedy_row0_common_prefix_with_batch1" in info:
        print(f"# greedy, row 0 against batch 1, leading tokens equal: {info['greedy_row0_common_prefix_with_batch1']}")


if __name__ == "__main__":
    main()
