"""LoRA training step: notelab (``notelab.peft`` + ``notelab.train.fit`` with its defaults) against ``peft`` on
transformers' LlamaForCausalLM of the same shape, in one run; and full fine-tuning vs LoRA peak memory against
``notelab.peft.estimate``.

Shape: Llama-3.2-1B by default (dim 2048, 16 layers, 32 heads, 8 kv heads, FFN 8192, vocab 128,256, tied
embeddings), random weights (speed and memory do not depend on training). LoRA r=16, alpha 32 on every
linear but the output layer; bf16 base weights, fp32 adapter weights (as peft keeps them); batch 8 x 2048
tokens of random ids; AdamW.

- notelab LoRA: ``fit`` with its defaults (torch.compile and bf16 autocast on CUDA), next-token loss through
  ``notelab.lm.train.next_token_loss`` (the chunked loss: no (B, T, V) float32 logits);
- notelab full: the same model in fp32 weights, every parameter trained (fit's mixed precision);
- peft: ``get_peft_model(LlamaForCausalLM, LoraConfig(...))``, eager, bf16 autocast, ``model(ids, labels=ids)``.

Each reports tokens/s over the steps after ``--warmup`` and ``torch.cuda.max_memory_allocated`` (peak bytes);
the estimator's figure for the same setting is printed beside notelab's (``benchmarks/peft_memory.py`` compares
the two in detail).

    python benchmarks/peft_train_gpu.py                                  # H200: the issue's setting
    python benchmarks/peft_train_gpu.py --device cpu --dim 64 --layers 2 --heads 4 --kv-heads 2 --ffn 128 \\
        --vocab 512 --seq 32 --batch 2 --steps 3 --warmup 1                # smoke test on a CPU
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from notelab.core.runtime import get_device
from notelab.lm import Llama, LlamaConfig
from notelab.lm.loss import default_chunk
from notelab.lm.train import next_token_loss
from notelab.peft import LoraConfig, get_peft_model
from notelab.peft.estimate import MethodSpec, ModelShape, estimate
from notelab.train import TrainConfig, fit


def notelab_run(args: argparse.Namespace, device: torch.device, method: str) -> dict[str, float]:
    cfg = LlamaConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                      n_kv_heads=args.kv_heads, ffn_hidden_dim=args.ffn, max_seq_len=args.seq + 1,
                      tie_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = Llama(cfg).to(device)
    if method == "lora":
        model = model.to(torch.bfloat16)
        model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear"))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    data = torch.randint(0, args.vocab, (args.batch * (args.steps + 1), args.seq + 1))
    times: list[float] = []

    def clock(step: int, logs: dict) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    tc = TrainConfig(steps=args.steps, batch_size=args.batch, lr=1e-4, progress=False, log_every=args.steps,
                     device=str(device), activation_checkpointing=args.checkpointing)  # fmt: skip
    fit(model, next_token_loss, data, tc, callbacks=clock)
    tokens = args.batch * args.seq * (len(times) - 1 - args.warmup)
    return {"tok_s": tokens / (times[-1] - times[args.warmup]),
            "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan")}  # fmt: skip


def peft_run(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    import transformers

    import peft

    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=args.ffn,
                                   num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                   num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq + 1,
                                   tie_word_embeddings=True, attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=torch.bfloat16)
    if args.checkpointing:
        model.gradient_checkpointing_enable()
    model = peft.get_peft_model(model, peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear",
                                                       task_type="CAUSAL_LM"))  # fmt: skip
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
    tokens = args.batch * args.seq * (len(times) - 1 - args.warmup)
    return {"tok_s": tokens / (times[-1] - times[args.warmup]),
            "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan")}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing in both")
    p.add_argument("--skip-full", action="store_true")
    args = p.parse_args()
    device = get_device(args.device)
    shape = ModelShape(args.vocab, args.dim, args.layers, args.heads, args.kv_heads, args.ffn, tie_embeddings=True)
    results = {"notelab lora": notelab_run(args, device, "lora"), "peft lora": peft_run(args, device)}
    if not args.skip_full:
        results["notelab full"] = notelab_run(args, device, "full")
    for name, r in results.items():
        if not name.startswith("notelab"):  # the estimator models fit's compiled path, not peft's eager one
            continue
        spec = MethodSpec("full" if "full" in name else "lora", r=args.r)
        e = estimate(shape, spec, dtype="bf16", optimizer="adamw", batch=args.batch, seq=args.seq,
                     loss_chunk=default_chunk(args.vocab))  # fmt: skip
        r["estimate_gb"] = (e.total_checkpointed if args.checkpointing else e.total) / 1e9
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(json.dumps({"device": name, "torch": torch.__version__, "args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
