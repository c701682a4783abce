"""Peak GPU memory of fine-tuning through ``notelab.train.fit`` with its defaults, measured beside
``notelab.peft.estimate``'s prediction, for full fine-tuning and LoRA on a Llama-3.2-1B-shaped model.

Shape: dim 2048, 16 layers, 32 heads, 8 kv heads, FFN 8192, vocab 128,256, tied embeddings (1.24 B
parameters), random weights and random tokens (memory does not depend on them). What runs is
``fit(model, next_token_loss, tokens, TrainConfig(steps, batch_size, lr, log_every, progress=False))``:
every other setting is fit's default (on CUDA: torch.compile, bf16 autocast, fused AdamW, clipping, the
chunked cross-entropy fused with the head; no activation checkpointing unless a point asks for it).

- full: the model in float32, every parameter trained (fit's mixed precision);
- lora: the base cast to bf16 and frozen, LoRA r=16, alpha 32 on every linear of every block, the
  adapters in float32 (as peft keeps them).

Each point runs in its own process (a clean allocator); ``peak`` is ``torch.cuda.max_memory_allocated``
over the whole ``fit`` call (compile included), as the issue asks. Beside it, per step from the second
on (AdamW's states exist): the bytes held when the loss starts (weights + optimizer states), the peak
through forward and loss, and the step's peak; the estimator's matching terms are printed with them.
A JSON line per point is printed as soon as it is measured; a table at the end.

    python benchmarks/peft_memory.py                                   # H200, about 4 minutes
    python benchmarks/peft_memory.py --device cpu --tiny               # smoke test of the script (no figures)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Any

import torch

from notelab.core.runtime import get_device
from notelab.lm import Llama, LlamaConfig
from notelab.lm.loss import default_chunk
from notelab.lm.train import next_token_loss
from notelab.peft import LoraConfig, get_peft_model
from notelab.peft.estimate import MethodSpec, ModelShape, estimate
from notelab.train import TrainConfig, fit

# (method, batch, seq, activation checkpointing), in the order they are run while time is left
POINTS = ["full,8,2048", "lora,8,2048", "full,4,2048", "lora,4,1024", "full,8,2048,ckpt", "lora,8,2048,ckpt"]
SHAPES = {
    "1b": dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden_dim=8192),
    "tiny": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=128),
}


def parse_point(text: str) -> tuple[str, int, int, bool]:
    parts = text.split(",")
    if len(parts) not in (3, 4) or parts[0] not in ("full", "lora") or parts[3:] not in ([], ["ckpt"]):
        raise SystemExit(f"--point: expected full|lora,BATCH,SEQ[,ckpt], got {text!r}")
    return parts[0], int(parts[1]), int(parts[2]), len(parts) == 4


def build(method: str, cfg: LlamaConfig, r: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = Llama(cfg).to(device)
    if method == "full":
        return model
    model = get_peft_model(model.to(torch.bfloat16), LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def measure(point: str, shape_name: str, r: int, steps: int, device: torch.device) -> dict[str, Any]:
    """One point in this process: fit's run with per-step memory marks (bytes)."""
    method, batch, seq, ckpt = parse_point(point)
    cfg = LlamaConfig(**SHAPES[shape_name], max_seq_len=seq + 1, tie_embeddings=True)
    cuda = device.type == "cuda"
    model = build(method, cfg, r, device)
    data = torch.randint(0, cfg.vocab_size, (batch * steps, seq + 1))
    marks: list[dict[str, int]] = []
    overall = [0]

    def loss_fn(m: torch.nn.Module, b: torch.Tensor, g: torch.Generator) -> Any:
        mark: dict[str, int] = {}
        if cuda:  # the peak so far is folded into `overall` before the per-step counter restarts
            overall[0] = max(overall[0], torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
            mark["at_loss_start"] = torch.cuda.memory_allocated()
        out = next_token_loss(m, b, g)
        if cuda:
            mark["forward_and_loss_peak"] = torch.cuda.max_memory_allocated()
            mark["after_loss"] = torch.cuda.memory_allocated()
        marks.append(mark)
        return out

    def after_step(step: int, logs: dict) -> None:
        if cuda:
            marks[-1]["step_peak"] = torch.cuda.max_memory_allocated()

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    tc = TrainConfig(steps=steps, batch_size=batch, lr=1e-4, log_every=steps, progress=False, device=str(device),
                     activation_checkpointing=ckpt)  # fmt: skip
    fit(model, loss_fn, data, tc, callbacks=after_step)
    seconds = time.perf_counter() - t0
    peak = max(overall[0], torch.cuda.max_memory_allocated()) if cuda else math.nan
    shape = ModelShape(cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim,
                       tie_embeddings=True)  # fmt: skip
    e = estimate(shape, MethodSpec(method, r=r), dtype="bf16" if cuda else "fp32", optimizer="adamw", batch=batch,
                 seq=seq, loss_chunk=default_chunk(cfg.vocab_size))  # fmt: skip
    predicted = e.total_checkpointed if ckpt else e.total
    acts = e.activations_checkpointed if ckpt else e.activations
    return {
        "point": point,
        "peak_gb": peak / 1e9,
        "estimate_gb": predicted / 1e9,
        "rel_error": predicted / peak - 1 if cuda else math.nan,
        "steps_from_2": [{k: v / 1e9 for k, v in m.items()} for m in marks[1:]],
        "estimate_terms_gb": {
            "held_at_loss_start (weights+optimizer)": (e.weights + e.optimizer) / 1e9,
            "activations": acts / 1e9,
            "loss_working": e.loss_working / 1e9,
            "head_gradient": e.head_gradient / 1e9,
            "backward_working": e.backward_working / 1e9,
            "gradients": e.gradients / 1e9,
            "recompute": e.recompute / 1e9,
        },  # fmt: skip
        "seconds": seconds,
        "other_gpu_users_in_this_process": sorted({"jax", "tensorflow"} & set(sys.modules)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="a tiny shape (smoke test)")
    p.add_argument("--points", default=" ".join(POINTS), help="space-separated method,batch,seq[,ckpt]")
    p.add_argument("--point", help="(internal) measure one point in this process and print its JSON")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per point (AdamW's states exist from 2)")
    p.add_argument("--budget-s", type=float, default=200, help="start no point after this many seconds")
    args = p.parse_args()
    device = get_device(args.device)
    shape_name = "tiny" if args.tiny else "1b"
    if args.point:
        print(json.dumps(measure(args.point, shape_name, args.r, args.steps, device)))
        return
    points = args.points.split()
    for point in points:
        parse_point(point)
    t0, results, longest = time.perf_counter(), [], 0.0
    for point in points:
        left = args.budget_s - (time.perf_counter() - t0)
        if left < longest:
            print(
                json.dumps({"point": point, "skipped": f"{left:.0f} s of the budget left, a point took {longest:.0f}"})
            )
            continue
        cmd = [sys.executable, __file__, "--point", point, "--device", args.device, "--r", str(args.r),
               "--steps", str(args.steps)] + (["--tiny"] if args.tiny else [])  # fmt: skip
        t = time.perf_counter()
        # A stray JAX import (bm25s once did it) would take 75% of the card before torch allocates anything.
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
        run = subprocess.run(cmd, capture_output=True, text=True, env=env)
        longest = max(longest, time.perf_counter() - t)
        if run.returncode != 0:
            print(json.dumps({"point": point, "failed": run.stderr.strip().splitlines()[-3:]}))
            continue
        result = json.loads(run.stdout.strip().splitlines()[-1])
        results.append(result)
        print(json.dumps(result), flush=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\n{name}, torch {torch.__version__}, {shape_name} shape, LoRA r={args.r}, {args.steps} steps a point")
    print(f"{'point':<20}{'measured GB':>12}{'estimate GB':>12}{'error':>9}{'seconds':>9}")
    for r in results:
        print(f"{r['point']:<20}{r['peak_gb']:>12.2f}{r['estimate_gb']:>12.2f}{100 * r['rel_error']:>8.1f}%"
              f"{r['seconds']:>9.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
