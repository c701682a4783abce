"""`notelab lm train --preset llama3.2-1b` as a user runs it, on one GPU: tokens/s, MFU and peak memory.

    python benchmarks/lm_train_cli.py --out train_cli.json          # on the GPU (about 3 minutes)
    python benchmarks/lm_train_cli.py --tiny                        # CPU smoke test of the script

What is timed is the command itself, in a child process, with nothing but the sizes set::

    notelab lm train --preset llama3.2-1b --data CORPUS --seq-len 2048 --batch-size 8 --steps S --log-every 1

so the run gets the CLI's defaults through ``pretrain`` and ``fit`` (on CUDA: compile, bf16 autocast, fused AdamW,
the chunked cross-entropy). Its BPE tokenizer is trained on ``CORPUS`` to the preset's vocabulary (128,256
tokens, the Llama 3 size): a text of random lowercase words (seeded), generated here, has enough distinct pairs
to reach it (real text of a few MB stops far below; speed does not depend on what the words mean). tokens/s and
peak memory come from the run's own ``log.jsonl`` (one record a step; ``max_memory_gb`` is
``torch.cuda.max_memory_allocated``), the median over the steps after ``--warmup`` (the compile is in the first).
MFU = ``notelab.lm.flops.flops_per_token`` x tokens/s over the card's bf16 matmul peak, measured in this run after
the training by ``benchmarks/llama_train_gpu.matmul_peak`` (8192^3 ``torch.mm``, best of three).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from llama_train_gpu import matmul_peak
from notelab.lm import LlamaConfig
from notelab.lm.flops import count_parameters, flops_per_token


def corpus(path: Path, words: int, seed: int = 0) -> None:
    """``words`` random lowercase words of 2-9 letters, 12 to a line."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    ws = ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(words)]
    path.write_text("\n".join(" ".join(ws[i : i + 12]) for i in range(0, words, 12)) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama3.2-1b")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the median (compile, first graphs)")
    p.add_argument("--words", type=int, default=1_000_000, help="size of the generated corpus")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `notelab lm train` flags")
    p.add_argument("--tiny", action="store_true", help="llama3-tiny on CPU, a few steps: a smoke test")
    p.add_argument("--out", help="JSON of every figure")
    args = p.parse_args(argv)
    device = "cpu" if args.tiny else "cuda"
    if args.tiny:
        args.preset, args.seq_len, args.batch_size, args.steps, args.warmup = "llama3-tiny", 64, 2, 4, 1
        args.words = 5000
    info: dict = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "preset": args.preset,
                  "seq_len": args.seq_len, "batch_size": args.batch_size, "steps": args.steps}  # fmt: skip
    if device == "cuda":
        info["device"] = torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory() as tmp:
        text, run = Path(tmp) / "corpus.txt", Path(tmp) / "run"
        corpus(text, args.words)
        cmd = [sys.executable, "-m", "notelab", "lm", "train", "--preset", args.preset, "--data", str(text),
               "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
               "--log-every", "1", "--no-progress", "--out", str(run), *args.extra]  # fmt: skip
        if args.tiny:
            cmd += ["--device", "cpu", "--vocab-size", "512"]
        info["command"] = "notelab " + " ".join(cmd[3:]).replace(str(text), "CORPUS").replace(str(run), "RUN")
        print(info["command"], flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        info["command_s"] = round(time.perf_counter() - t0, 1)
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", flush=True)
        if proc.returncode != 0:
            info["error"] = f"exit {proc.returncode}"
            return _finish(info, args.out, 1)
        records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
        vocab = json.loads((run / "config.json").read_text()).get("vocab_size")
    timed = [r for r in records if r["step"] > args.warmup]
    config = LlamaConfig.from_name(args.preset, vocab_size=vocab)
    tps = statistics.median(r["tokens_per_s"] for r in timed)
    info.update(vocab_size=vocab, params=count_parameters(config), tokens_per_s=round(tps),
                step_s=round(args.seq_len * args.batch_size / tps, 4),
                max_memory_gb=max((r.get("max_memory_gb", 0.0) for r in records), default=None),
                first_loss=records[0]["loss"], last_loss=records[-1]["loss"])  # fmt: skip
    if device == "cuda":
        peak = matmul_peak(torch.device("cuda"))
        info["peak_tflops"] = round(peak / 1e12, 1)
        info["mfu_%"] = round(100 * flops_per_token(config, args.seq_len, training=True) * tps / peak, 1)
    return _finish(info, args.out, 0)


def _finish(info: dict, out: str | None, code: int) -> int:
    print(json.dumps(info), flush=True)
    if out:
        Path(out).write_text(json.dumps(info, indent=1) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
