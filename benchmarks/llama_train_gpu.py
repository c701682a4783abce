"""Llama-3.2-1B-shape training through ``fit`` as a user calls it, against transformers, on one GPU.

What is timed is the product, with its defaults::

    fit(Llama(cfg), next_token_loss, PackedStream(tokens, seq, batch), TrainConfig(precision="bf16", ...))

(only ``steps``, ``batch_size``, ``log_every=1`` and ``progress=False`` set besides the precision):
on CUDA that is ``torch.compile`` ("auto"), bf16 autocast, fused AdamW, gradient clipping at
1.0 and the chunked cross-entropy of ``notelab.lm.loss`` that ``next_token_loss`` uses. tokens/s
come from fit's own log (``FitResult.history``, one record a step, after ``--warmup`` steps that
include the compile). The peer is transformers' ``LlamaForCausalLM`` (SDPA attention, fp32 master
weights, bf16 autocast) trained by the same ``fit`` with its float32-logits cross-entropy,
eager as transformers runs it (``compile=False``), in the same process; ``--variants`` adds
notelab with ``compile=False`` and with activation checkpointing.

MFU = (6 N + 12 L d T) x tokens/s (``notelab.lm.flops``, Kaplan et al. 2020 / PaLM) over the
card's bf16 matmul peak, measured in this run as the best of three timed batches of 8192 x 8192 x
8192 ``torch.mm`` on random data. Peak memory is ``torch.cuda.max_memory_allocated``.

    python benchmarks/llama_train_gpu.py --out train.json          # on the GPU (about 3 minutes)
    python benchmarks/llama_train_gpu.py --tiny --device cpu       # smoke test of the script
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from notelab.lm import Llama, LlamaConfig
from notelab.lm.convert import config_to_hf
from notelab.lm.data import PackedStream
from notelab.lm.flops import count_parameters, flops_per_token
from notelab.lm.train import next_token_loss
from notelab.train import TrainConfig, fit


def matmul_peak(device: torch.device, n: int = 8192, iters: int = 20) -> float:
    """bf16 FLOP/s of ``n x n @ n x n`` on random data: the best of three timed batches after a warm-up."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b)
    best = 0.0
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - t0))
    return best


def hf_loss(model: torch.nn.Module, batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """transformers' usual next-token loss: full logits, upcast to float32, cross-entropy."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(input_ids=inputs).logits
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return loss, {"tokens": float(targets.numel())}


def hf_model(config: LlamaConfig, device: torch.device) -> torch.nn.Module:
    import transformers

    cfg = transformers.LlamaConfig.from_dict(config_to_hf(config, torch.float32))
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="llama3.2-1b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps (the compile happens in the first)")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--variants", nargs="*", default=[], choices=["eager", "checkpointing"],
                   help="also notelab with compile=False (eager) / with activation checkpointing")  # fmt: skip
    p.add_argument("--tiny", action="store_true", help="a small model: a CPU smoke test of the script")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    overrides: dict[str, Any] = {}
    if args.tiny:
        args.preset, args.batch, args.seq, args.steps, args.warmup = "llama3-tiny", 2, 64, 2, 1
        overrides = {"vocab_size": 512}
    config = LlamaConfig.from_name(args.preset, **overrides)
    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "preset": args.preset,
        "params": count_parameters(config),
        "batch": args.batch,
        "seq": args.seq,
        "date": time.strftime("%Y-%m-%d"),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        args.skip_hf = True
    n = 512 if args.tiny else 8192
    peak = matmul_peak(device, n, 2 if args.tiny else 20)
    info["peak_tflops"] = peak / 1e12
    info["peak_product"] = f"{n}^3 bf16 torch.mm"
    print(json.dumps(info), flush=True)
    fpt = flops_per_token(config, args.seq, training=True)
    tokens = torch.randint(0, config.vocab_size, (4_000_000 if not args.tiny else 20_000,), dtype=torch.int32)
    stream = PackedStream(tokens, args.seq, args.batch)

    def run(make_model: Callable[[], torch.nn.Module], loss_fn: Callable, **config_kw: Any) -> dict[str, Any]:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        torch.manual_seed(0)
        model = make_model()
        train_config = TrainConfig(
            precision="bf16",
            steps=args.warmup + args.steps,
            batch_size=args.batch,
            log_every=1,
            progress=False,
            device=str(device),
            **config_kw,
        )
        t0 = time.perf_counter()
        result = fit(model, loss_fn, stream, train_config)
        records = [r for r in result.history if r["step"] > args.warmup]
        # one record a step: seconds of that step = samples / samples_per_s
        seconds = sum(args.batch / r["samples_per_s"] for r in records)
        tok_s = sum(r["tokens_per_s"] * args.batch / r["samples_per_s"] for r in records) / seconds
        out = {
            "tokens_per_s": tok_s,
            "step_ms": 1e3 * seconds / len(records),
            "mfu": fpt * tok_s / peak,
            "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
            "loss_first_last": [result.history[0]["loss"], result.history[-1]["loss"]],
            "wall_s": time.perf_counter() - t0,
        }
        del model, result
        return out

    def llama() -> torch.nn.Module:
        with torch.device(device):
            return Llama(config)

    phases: list[tuple[str, Callable[[], dict]]] = [("notelab fit, defaults", lambda: run(llama, next_token_loss))]
    if "eager" in args.variants:
        phases.append(("notelab fit, compile=False", lambda: run(llama, next_token_loss, compile=False)))
    if "checkpointing" in args.variants:
        ac = lambda: run(llama, next_token_loss, activation_checkpointing=True)  # noqa: E731
        phases.append(("notelab fit, activation_checkpointing", ac))
    if not args.skip_hf:
        hf_name = "transformers LlamaForCausalLM (sdpa), fit compile=False"
        phases.append((hf_name, lambda: run(lambda: hf_model(config, device), hf_loss, compile=False)))
    results: dict[str, Any] = {"info": info, "runs": {}}
    for name, fn in phases:
        print(f"== {name}", flush=True)
        try:
            results["runs"][name] = fn()
            print("   " + json.dumps(results["runs"][name]), flush=True)
        except Exception as e:  # one failed phase must not lose the others' figures
            traceback.print_exc()
            results["runs"][name] = {"error": f"{type(e).__name__}: {e}"[:400]}
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    shape = f"{args.preset} ({info['params']:,} params), batch {args.batch} x seq {args.seq}"
    print(f"\n# {info['device']}, torch {info['torch']}, {shape}; peak {info['peak_tflops']:.0f} TFLOP/s")
    print("| run | tokens/s | MFU | peak memory GB | step ms |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in results["runs"].items():
        if "error" in r:
            print(f"| {name} | error: {r['error'][:80]} | | | |")
        else:
            mem = f"{r['peak_mem_gb']:.1f}" if r["peak_mem_gb"] is not None else "-"
            print(f"| {name} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | {mem} | {r['step_ms']:.1f} |")
    return results


if __name__ == "__main__":
    main()
