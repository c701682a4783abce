"""Data-parallel scaling of ``fit`` on one host: 1 GPU vs N GPUs (FSDP2 and DDP), and an 8B-shape step.

Run by torchrun, every part through the public ``fit`` as a user calls it::

    torchrun --nproc-per-node 2 benchmarks/fsdp_scaling.py --out fsdp.json        # 2 GPUs, 5-6 minutes
    torchrun --nproc-per-node 2 benchmarks/fsdp_scaling.py --tiny                 # CPU smoke test (gloo)

Parts, in order (each in its own try / except, so one failure loses only its own figures):

1. ``1gpu``: rank 0 alone (the other ranks wait), ``fit(Llama(preset), next_token_loss,
   PackedStream(...), TrainConfig(precision="bf16", ...))`` with its defaults (compile, fused AdamW).
2. ``fsdp``: every rank, the same per-GPU batch, ``parallel="fsdp"`` (FSDP2 per decoder block,
   bf16 compute, fp32 reduce-scatter).
3. ``8b-fsdp``: the Llama-3.1-8B shape with random weights, built on the meta device and
   materialised shard by shard, one full fine-tuning step after another (AdamW on every weight,
   activation checkpointing, ``compile=False``) under FSDP on all ranks.
4. ``8b-1gpu``: the same model and batch on rank 0 alone, the replica DDP would keep on every GPU:
   weights + grads + AdamW states are 16 bytes a parameter (DDP adds 4 for its gradient buckets,
   printed as an estimate); an out-of-memory error is reported as such.
5. ``ddp``: as 2 with ``parallel="ddp"``.
7. ``8b-ddp`` (last, after the summary): part 3's model and batch under ``parallel="ddp"``: DDP keeps
   20 bytes a parameter on every GPU (its gradient buckets are a second copy of the grads); an
   out-of-memory error is reported by every rank.
6. ``fsdp-offload``: as 2 with ``cpu_offload=True`` (eager, 2 timed steps): the sharded weights, grads
   and AdamW states in CPU memory, the optimizer step on the CPU.

tokens/s come from fit's own log (one record a step; the ``--warmup`` first steps, which include the
compile, are not counted) and count every rank's tokens. Scaling efficiency = tokens/s at N GPUs /
(N x tokens/s at 1 GPU). MFU per GPU = (6 P + 12 L d T) x tokens/s / N over the bf16 matmul peak
measured in this run on each GPU (``llama_train_gpu.matmul_peak``: 8192^3 ``torch.mm``). Peak memory
is ``torch.cuda.max_memory_allocated`` at the last training step, per rank.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from llama_train_gpu import matmul_peak  # the same peak measurement as the one-GPU benchmark
from notelab.core.limits import allow_large_models
from notelab.lm import Llama, LlamaConfig
from notelab.lm.data import PackedStream
from notelab.lm.flops import count_parameters, flops_per_token
from notelab.lm.train import next_token_loss
from notelab.train import TrainConfig, fit
from notelab.train.parallel import STATE_BYTES_PER_PARAM, training_state_bytes


def say(text: str) -> None:
    if dist.get_rank() == 0:
        print(text, flush=True)


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Make fit on this rank see a one-process run (torchrun's variables hidden for the while)."""
    keys = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
    saved = {k: os.environ.pop(k) for k in keys if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


class PeakMemory:
    """fit callback: ``torch.cuda.max_memory_allocated`` after each step (the last one is kept)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.bytes = device, 0

    def __call__(self, step: int, logs: dict[str, Any]) -> None:
        if self.device.type == "cuda":
            self.bytes = torch.cuda.max_memory_allocated(self.device)


def per_rank(value: float, device: torch.device) -> list[float]:
    """``value`` of every rank (rank 0's first)."""
    world = dist.get_world_size()
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    out = [torch.zeros_like(t) for _ in range(world)]
    dist.all_gather(out, t)
    return [float(x) for x in out]


def timed(history: list[dict[str, Any]], warmup: int, batch: int, world: int = 1) -> dict[str, float]:
    """tokens/s (all ranks) and ms per step over the steps after ``warmup``, from fit's log."""
    records = [r for r in history if r["step"] > warmup]
    # one record a step; samples_per_s counts every rank's samples: the step took batch * world / samples_per_s
    seconds = sum(batch * world / r["samples_per_s"] for r in records)
    tokens = sum(r["tokens_per_s"] * batch * world / r["samples_per_s"] for r in records)
    return {"tokens_per_s": tokens / seconds, "step_ms": 1e3 * seconds / len(records)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama3.2-1b")
    p.add_argument("--big", default="llama3.1-8b", help="the shape of parts 3 and 4")
    p.add_argument("--batch", type=int, default=8, help="per GPU, parts 1, 2 and 5")
    p.add_argument("--big-batch", type=int, default=2, help="per GPU, parts 3 and 4")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps (the compile happens in the first)")
    p.add_argument("--big-steps", type=int, default=3, help="steps of parts 3 and 4 (the first is not timed)")
    p.add_argument(
        "--parts", nargs="*", default=["1gpu", "fsdp", "8b-fsdp", "8b-1gpu", "ddp", "fsdp-offload", "8b-ddp"]
    )
    p.add_argument("--budget", type=float, default=330.0, help="seconds: no part starts after this (rank 0's clock)")
    p.add_argument("--tiny", action="store_true", help="small models on the CPU (gloo): a smoke test of the script")
    p.add_argument("--out", default=None, help="JSON of the results (rank 0)")
    args = p.parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.tiny:
        args.preset, args.big, args.batch, args.big_batch, args.seq = "llama3-tiny", "llama3-tiny", 2, 2, 32
        args.steps, args.warmup, args.big_steps = 2, 1, 2
        overrides = {"vocab_size": 512}
    t_start = time.perf_counter()
    cuda = not args.tiny
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device)  # gloo: the offload part's CPU shards
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    config = LlamaConfig.from_name(args.preset, **overrides)
    with allow_large_models(True):
        big = LlamaConfig.from_name(args.big, **overrides)
    peak = matmul_peak(device, 512 if args.tiny else 8192, 2 if args.tiny else 20)
    peaks = per_rank(peak, device)
    info = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "gpus": world,
        "torch": torch.__version__,
        "preset": args.preset,
        "params": count_parameters(config),
        "batch_per_gpu": args.batch,
        "seq": args.seq,
        "peak_tflops_per_gpu": [round(x / 1e12, 1) for x in peaks],
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    say(json.dumps(info))
    fpt = flops_per_token(config, args.seq, training=True)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (4_000_000 if cuda else 20_000,), dtype=torch.int32, generator=g)

    def train(
        cfg: LlamaConfig, batch: int, steps: int, *, on_meta: bool = False, **kw: Any
    ) -> tuple[list[dict[str, Any]], int]:
        """fit as a user calls it; returns fit's log and this rank's peak memory at the last step."""
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        torch.manual_seed(0)
        with allow_large_models(True), torch.device("meta" if on_meta else device):
            model = Llama(cfg)
        mem = PeakMemory(device)
        tc = TrainConfig(precision="bf16", steps=steps, batch_size=batch, log_every=1, progress=False, **kw)
        history = fit(model, next_token_loss, PackedStream(tokens, args.seq, batch), tc, callbacks=[mem]).history
        del model
        if cuda and not mem.bytes:  # DDP calls callbacks on rank 0 only
            mem.bytes = torch.cuda.max_memory_allocated(device)
        return history, mem.bytes

    results: dict[str, Any] = {"info": info, "parts": {}}

    def one_gpu() -> dict[str, Any]:
        out: dict[str, Any] = {}
        try:
            if rank == 0:
                with alone():
                    history, mem = train(config, args.batch, args.warmup + args.steps, device=str(device))
                out = timed(history, args.warmup, args.batch)
                out.update(mfu=fpt * out["tokens_per_s"] / peaks[0], peak_mem_gb=mem / 1e9)
        finally:
            dist.barrier()  # also after a failure on rank 0: the ranks' collectives stay in step
        return out

    def sharded(parallel: str, warmup: int = args.warmup, steps: int = args.steps, **kw: Any) -> Callable[[], dict]:
        def part() -> dict[str, Any]:
            history, mem = train(config, args.batch, warmup + steps, parallel=parallel, **kw)
            out = timed(history, warmup, args.batch, world) if rank == 0 else {"tokens_per_s": 0.0}
            tok_s = per_rank(out["tokens_per_s"], device)[0]
            mems = per_rank(mem, device)
            out = {"tokens_per_s": tok_s, "step_ms": out.get("step_ms")}
            out["mfu_per_gpu"] = [fpt * tok_s / world / pk for pk in peaks]
            out["peak_mem_gb_per_gpu"] = [m / 1e9 for m in mems]
            base = results["parts"].get("1gpu", {}).get("tokens_per_s")
            if base:
                out["scaling_efficiency"] = tok_s / (world * base)
            return out

        return part

    big_state = training_state_bytes(count_parameters(big))

    def big_fsdp() -> dict[str, Any]:
        kw = dict(parallel="fsdp", activation_checkpointing=True, compile=False)
        history, mem = train(big, args.big_batch, args.big_steps, on_meta=True, **kw)
        mems = per_rank(mem, device)
        out = timed(history, 1, args.big_batch, world) if rank == 0 else {}
        out.update(
            params=count_parameters(big),
            state_gb_total=big_state / 1e9,
            state_gb_per_gpu_estimate=big_state / world / 1e9,
            peak_mem_gb_per_gpu=[m / 1e9 for m in mems],
            losses=[r["loss"] for r in history],
        )
        return out

    def big_one_gpu() -> dict[str, Any]:
        total = torch.cuda.get_device_properties(device).total_memory if cuda else 0
        # DDP also keeps its gradient buckets (a second fp32 copy of the grads): 20 B/param on every GPU.
        ddp_gb = training_state_bytes(count_parameters(big), STATE_BYTES_PER_PARAM + 4) / 1e9
        out: dict[str, Any] = {"state_gb": big_state / 1e9, "ddp_state_gb": ddp_gb, "device_gb": total / 1e9}
        try:
            if rank == 0:
                try:
                    with alone():
                        kw = dict(activation_checkpointing=True, compile=False, device=str(device))
                        _, mem = train(big, args.big_batch, 2, **kw)
                    out.update(fits=True, peak_mem_gb=mem / 1e9)
                except torch.OutOfMemoryError as e:
                    out.update(fits=False, error=" ".join(str(e).split())[:300])
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
        finally:
            dist.barrier()
        return out

    def big_ddp() -> dict[str, Any]:
        """DDP with the 8B shape on every GPU; no collective of the script's own, since a rank that runs out of
        memory in backward leaves the others waiting in DDP's all-reduce (hence the last part, after the summary)."""
        out: dict[str, Any] = {}
        try:
            kw = dict(parallel="ddp", activation_checkpointing=True, compile=False)
            _, mem = train(big, args.big_batch, 2, **kw)
            out.update(fits=True, peak_mem_gb=mem / 1e9)
        except torch.OutOfMemoryError as e:
            out.update(fits=False, error=" ".join(str(e).split())[:300])
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        return out

    parts = {
        "1gpu": one_gpu,
        "fsdp": sharded("fsdp"),
        "8b-fsdp": big_fsdp,
        "8b-1gpu": big_one_gpu,
        "ddp": sharded("ddp"),
        # shards, grads and AdamW states in CPU memory (the step runs there): memory for speed
        "fsdp-offload": sharded("fsdp", 1, 2, cpu_offload=cuda, compile=False),
    }
    for name in [n for n in args.parts if n != "8b-ddp"]:
        elapsed = per_rank(time.perf_counter() - t_start, device)[0]  # rank 0's, so every rank decides alike
        if elapsed > args.budget:
            say(f"== {name}: skipped, {elapsed:.0f} s past the start (--budget {args.budget:.0f})")
            results["parts"][name] = {"error": "skipped: time budget"}
            continue
        say(f"== {name}")
        t0 = time.perf_counter()
        try:
            results["parts"][name] = parts[name]()
        except Exception as e:  # one failed part must not lose the others' figures
            if rank == 0:
                traceback.print_exc()
            results["parts"][name] = {"error": " ".join(f"{type(e).__name__}: {e}".split())[:400]}
        results["parts"][name]["wall_s"] = time.perf_counter() - t0
        say("   " + json.dumps(results["parts"][name]))
        if args.out and rank == 0:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    try:
        summarize(results, world)
    except Exception as e:  # the JSON lines above hold every figure
        say(f"summary failed: {type(e).__name__}: {e}")
    if "8b-ddp" in args.parts:
        need = training_state_bytes(count_parameters(big), STATE_BYTES_PER_PARAM + 4) / 1e9
        say(f"\n== 8b-ddp (DDP needs {need:.1f} GB per GPU: weights, grads, gradient buckets, AdamW; "
            "every rank prints its own line)")  # fmt: skip
        t0 = time.perf_counter()
        try:
            result = big_ddp()
        except Exception as e:
            result = {"error": " ".join(f"{type(e).__name__}: {e}".split())[:300]}
        result["wall_s"] = time.perf_counter() - t0
        print(f"   rank {rank}: " + json.dumps(result), flush=True)
        results["parts"]["8b-ddp"] = result
        if args.out and rank == 0:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    dist.destroy_process_group()
    return results


def summarize(results: dict[str, Any], world: int) -> None:
    if dist.get_rank() != 0:
        return
    info, parts = results["info"], results["parts"]
    say(f"\n# {info['device']} x {world}, torch {info['torch']}, {info['preset']} ({info['params']:,} params), "
        f"{info['batch_per_gpu']} x {info['seq']} tokens per GPU, bf16; "
        f"peak {info['peak_tflops_per_gpu']} TFLOP/s")  # fmt: skip
    say("| run | GPUs | tokens/s | scaling efficiency | MFU per GPU | peak memory per GPU (GB) |")
    say("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, n in (("1gpu", 1), ("fsdp", world), ("ddp", world), ("fsdp-offload", world)):
        r = parts.get(name)
        if r is None:
            continue
        if "error" in r:
            say(f"| {name} | {n} | error: {r['error'][:100]} | | | |")
            continue
        mfu = r.get("mfu_per_gpu", [r.get("mfu", 0.0)])
        mem = r.get("peak_mem_gb_per_gpu", [r.get("peak_mem_gb", 0.0)])
        eff = f"{100 * r['scaling_efficiency']:.1f}%" if "scaling_efficiency" in r else "-"
        say(f"| {name} | {n} | {r['tokens_per_s']:,.0f} | {eff} | {', '.join(f'{100 * m:.1f}%' for m in mfu)} | "
            f"{', '.join(f'{m:.1f}' for m in mem)} |")  # fmt: skip
    big, one = parts.get("8b-fsdp", {}), parts.get("8b-1gpu", {})
    if big and "error" not in big:
        say(f"\n8B-shape full fine-tune under FSDP on {world} GPUs: {big['params']:,} params, "
            f"{big['state_gb_total']:.1f} GB of weights + grads + AdamW states (16 B/param), "
            f"{big['state_gb_per_gpu_estimate']:.1f} GB per GPU sharded; measured peak "
            f"{', '.join(f'{m:.1f}' for m in big['peak_mem_gb_per_gpu'])} GB per GPU; "
            f"{big.get('tokens_per_s', 0):,.0f} tokens/s, losses {big['losses']}")  # fmt: skip
    elif big:
        say(f"\n8B-shape under FSDP: error: {big['error']}")
    if one and "state_gb" not in one:
        say(f"8B shape on one GPU: error: {one.get('error')}")
    elif one:
        verdict = "fits" if one.get("fits") else "does not fit (out of memory)" if one.get("fits") is False else "?"
        say(f"8B shape on one GPU: weights + grads + AdamW = {one['state_gb']:.1f} GB "
            f"(DDP per GPU, with its gradient buckets: {one['ddp_state_gb']:.1f} GB) vs {one['device_gb']:.1f} GB "
            f"on the device; one process, no DDP buckets, measured: {verdict}"
            + (f", peak {one['peak_mem_gb']:.1f} GB" if one.get("peak_mem_gb") else "")
            + (f"; {one['error'][:200]}" if one.get("error") else ""))  # fmt: skip


if __name__ == "__main__":
    main()
