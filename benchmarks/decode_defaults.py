"""Decoding as a user gets it: ``generate`` with its defaults and ``notelab lm generate``, one GPU, a few minutes.

    python benchmarks/decode_defaults.py [--batches 1 8 32] [--out FILE.json]

Llama-3.2-1B shape, random weights, bf16, P-token prompts (P = 64), N new tokens (N = 256), no stop tokens.
For each batch B: ``generate(model, prompts, N)`` (greedy) and ``generate(..., temperature=0.8, top_p=0.95,
seed=0)`` (sampled), each timed on its second call (the first compiles and captures), in tokens/s and % of
the batch roofline B x copy bandwidth / (weight bytes + the KV bytes a step reads at the mean context
P + (N - 1) / 2) (``benchmarks/llama_gpu.py``'s definition); with ``--reference``, the greedy tokens'
agreement with the reference path's (``path="reference"``, the eager loop) in bf16; factual-nucleus
sampling (``top_p=FactualNucleus``, Lee et al. 2022) at batches 1 and 8. Then ``notelab lm generate``
(default options but ``--max-new-tokens N``) on a run folder of the same model saved in bf16 with a
tokenizer of one entry per id, and the rates it prints. Phases run greedy at every batch first, then
sampled, factual, the CLI; those that would start after ``--budget-s`` are skipped, and with ``--only REGEX``
those whose names do not match. ``--breakdown`` (CUDA): after each batched call, where its time went, timed on
the engine ``generate`` holds: one decode step's replay with every row at the mean context, the captured prompt
forward's replay and ``refresh_weights``; the rest of the call is the whole less N - 1 steps. ``--tiny``: a small
model on CPU (a smoke test of the script).
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
from notelab.lm import Llama, LlamaConfig, generate
from notelab.lm.flops import weight_bytes
from notelab.lm.sampling import FactualNucleus

SAMPLED = {"temperature": 0.8, "top_p": 0.95, "seed": 0}


class Phases:
    """Runs named phases in order, prints one line of figures each, keeps them (JSON at ``out`` after each),
    and skips the phases that would start after ``budget_s`` seconds."""

    def __init__(self, budget_s: float, out: str | None, only: str | None = None) -> None:
        self.start, self.budget_s, self.out = time.perf_counter(), budget_s, out
        self.only = None if only is None else re.compile(only)
        self.results: dict[str, dict] = {}

    def __call__(self, name: str, fn: Callable[[], dict], always: bool = False) -> None:
        if not always and self.only is not None and not self.only.search(name):
            return  # not asked for (``only``: a regular expression the names of the phases to run match)
        elapsed = time.perf_counter() - self.start
        if elapsed > self.budget_s:
            print(f"{name}: skipped (budget: {elapsed:.0f} s > {self.budget_s:.0f} s)", flush=True)
            return
        t0 = time.perf_counter()
        try:
            res = fn()
        except Exception as e:  # noqa: BLE001 - one failed phase must not lose the others' figures
            traceback.print_exc()
            res = {"error": f"{type(e).__name__}: {e}"}
        res["phase_s"] = round(time.perf_counter() - t0, 1)
        self.results[name] = res
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items())
        print(f"{name}: {shown}", flush=True)
        if self.out:
            Path(self.out).write_text(json.dumps(self.results, indent=1))

    def total(self) -> None:
        print(f"# total {time.perf_counter() - self.start:.0f} s", flush=True)


def timed(device: torch.device, fn: Callable[[], list[list[int]]]) -> tuple[float, list[list[int]]]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    """(share of rows equal in full, mean share of each row before its first difference)."""
    same = sum(x == y for x, y in zip(a, b)) / len(a)
    prefix = []
    for x, y in zip(a, b):
        k = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
        prefix.append(k / max(len(x), 1))
    return same, sum(prefix) / len(prefix)


def padded_tokenizer(vocab_size: int):  # noqa: ANN201 - a notelab.data.Tokenizer
    """A small BPE tokenizer padded with named ids up to ``vocab_size`` entries, so whatever random weights
    generate decodes; its sentence ends are the small BPE's ('.', '!', newline tokens)."""
    from tokenizers import Tokenizer as HFTokenizer

    from notelab.data.tokenizer import Tokenizer

    small = Tokenizer.train(["The quick brown fox. Jumps over the lazy dog!\n"] * 20, vocab_size=300)
    spec = json.loads(small.backend.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(small.vocab_size, vocab_size):
        vocab[f"<{i}>"] = i
    return Tokenizer(HFTokenizer.from_str(json.dumps(spec)))


def time_cli(model: Llama, prompt: list[int], new_tokens: int, roofline1: float) -> dict:
    """``notelab lm generate`` with default options on a run folder of ``model``; the rates it prints."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "run"
        padded_tokenizer(model.config.vocab_size).save(folder)
        model.save_pretrained(folder)
        ids = ",".join(str(t % 300) for t in prompt)
        code = "import sys; from notelab.cli import main; sys.exit(main())"  # `notelab`, in this interpreter
        cmd = [sys.executable, "-c", code, "lm", "generate", "--checkpoint", str(folder), "--prompt-ids", ids,
               "--max-new-tokens", str(new_tokens)]  # fmt: skip
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
        res["after_two_steps_of_roofline_%"] = 100 * rates[1] / roofline1
    return res


class Bench:
    """The card's bandwidth, the bf16 model and its prompts, and the roofline, shared by the decode benchmarks."""

    def __init__(self, preset: str, prompt: int, new_tokens: int, batch: int, tiny: bool) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
        self.preset, self.P, self.N, self.batch, self.tiny = preset, prompt, new_tokens, batch, tiny
        self.bw = float("nan")
        self.model: Llama | None = None

    def card(self) -> dict:
        nbytes, iters = (2**24, 3) if self.tiny else (2**32, 20)
        self.bw = copy_bandwidth(self.device, nbytes, iters)
        return {"copy_GB_per_s": self.bw / 1e9}

    def build(self) -> dict:
        torch.manual_seed(0)  # the same weights every time it is built
        with torch.device(self.device):
            model = Llama(LlamaConfig.from_name(self.preset))
        self.model = model.to(torch.bfloat16).eval()
        self.weight_bytes = weight_bytes(model)
        g = torch.Generator().manual_seed(1)
        vocab = model.config.vocab_size
        self.prompts = torch.randint(1, vocab, (self.batch, self.P), generator=g).tolist()
        return {"weight_GB": self.weight_bytes / 1e9}

    def roofline(self, batch: int) -> float:
        kv = kv_bytes_per_step(self.model.config, batch, self.P + (self.N - 1) / 2)
        return batch * self.bw / (self.weight_bytes + kv)

    def figures(self, batch: int, seconds: float, out: list[list[int]]) -> dict:
        tps = sum(len(r) for r in out) / seconds
        return {"tokens_per_s": tps, "of_roofline_%": 100 * tps / self.roofline(batch)}


def breakdown(bench: Bench, batch: int, whole_s: float) -> dict:
    """Parts of the call just timed, on the engine ``generate`` holds for it (its last captured step and prompt
    forward): the step replayed with every row at the mean context (rows held there), the prompt forward
    replayed, ``refresh_weights``; and the whole call less N - 1 steps (prefill, first token, host work)."""
    engine = sys.modules["notelab.lm.generate"]._HELD[bench.model]["engine"][1]

    def mean_s(fn: Callable[[], object], n: int) -> float:
        sync(bench.device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync(bench.device)
        return (time.perf_counter() - t0) / n

    with torch.inference_mode():
        engine.pos.fill_(bench.P + (bench.N - 1) // 2)
        engine.active.zero_()  # the rows stay at that slot
    step = mean_s(list(engine.steps.values())[-1].replay, 50)
    prefill = list(engine.prefills.values())[-1].graph.replay if engine.prefills else None
    res = {"step_replay_us": step * 1e6, "step_of_roofline_%": 100 * batch / step / bench.roofline(batch)}
    res["prefill_replay_ms"] = mean_s(prefill, 5) * 1e3 if prefill else float("nan")
    res["refresh_weights_ms"] = mean_s(engine.refresh_weights, 3) * 1e3
    res["call_less_steps_ms"] = (whole_s - (bench.N - 1) * step) * 1e3
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama3.2-1b")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--budget-s", type=float, default=230.0, help="skip the phases that start after this long")
    p.add_argument("--no-cli", action="store_true")
    p.add_argument("--reference", action="store_true", help="greedy agreement with the (slow) eager reference path")
    p.add_argument("--tiny", action="store_true", help="small model and sizes: a CPU smoke test")
    p.add_argument("--out", help="write every figure as JSON here")
    p.add_argument("--only", help="run only the phases whose names match this regular expression")
    p.add_argument("--breakdown", action="store_true", help="time the parts of each batched call (CUDA)")
    args = p.parse_args(argv)
    if args.tiny:
        args.preset, args.prompt, args.new_tokens, args.batches = "llama3-tiny", 8, 12, [1, 3]
    bench = Bench(args.preset, args.prompt, args.new_tokens, max(args.batches), args.tiny)
    dev = bench.device
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"# generate() defaults on {gpu}, torch {torch.__version__}, preset {args.preset}, P={args.prompt}, "
          f"N={args.new_tokens}", flush=True)  # fmt: skip
    phase = Phases(args.budget_s, args.out, args.only)
    phase("card", bench.card, always=True)
    phase("build bf16 model", bench.build, always=True)
    if bench.model is None:
        return 1
    print("# roofline tokens/s: " + ", ".join(f"B={b}: {bench.roofline(b):.0f}" for b in args.batches), flush=True)
    n = args.new_tokens

    refs: dict[int, list[list[int]]] = {}

    def reference(batch: int) -> Callable[[], dict]:
        def run() -> dict:
            refs[batch] = generate(bench.model, bench.prompts[:batch], n, path="reference")
            return {}

        return run

    def factual() -> dict:
        tok = padded_tokenizer(bench.model.config.vocab_size)
        t0 = time.perf_counter()
        f = FactualNucleus.for_tokenizer(tok, p=0.9, decay=0.9, floor=0.3)
        shared_kw.update(temperature=0.8, top_p=f, seed=0)
        return {"sentence_ends": len(f.sentence_end_ids), "of_ids": tok.vocab_size, "seconds": time.perf_counter() - t0}

    shared_kw: dict = {}

    def case(batch: int, kw: dict) -> Callable[[], dict]:
        def run() -> dict:
            prompts = bench.prompts[:batch]
            warm_s, _ = timed(dev, lambda: generate(bench.model, prompts, n, **kw))
            dt, out = timed(dev, lambda: generate(bench.model, prompts, n, **kw))
            res = {**bench.figures(batch, dt, out), "warmup_s": warm_s}
            if args.breakdown and dev.type == "cuda" and batch > 1:
                try:
                    res.update(breakdown(bench, batch, dt))
                except Exception as e:  # noqa: BLE001 - a diagnostic: the call's own figures stand
                    res["breakdown_error"] = f"{type(e).__name__}: {e}"
            if not kw and batch in refs:
                res["rows_equal_ref"], res["prefix_agree_ref"] = agreement(out, refs[batch])
            return res

        return run

    for b in args.batches:  # greedy at every batch, then sampled: phases past the budget are skipped
        if args.reference:
            phase(f"reference path x{b} (bf16 greedy tokens)", reference(b))
        phase(f"generate() x{b} greedy", case(b, {}))
    for b in args.batches:
        phase(f"generate() x{b} sampled (temperature 0.8, top_p 0.95)", case(b, SAMPLED))
    phase("FactualNucleus.for_tokenizer (128K-entry tokenizer)", factual)
    for b in [b for b in args.batches if b <= 8 and shared_kw]:  # not when the phase above failed or was skipped
        phase(f"generate() x{b} sampled, top_p=FactualNucleus(0.9, 0.9, 0.3)", case(b, shared_kw))
    if not args.no_cli:
        phase("notelab lm generate (CLI) x1 greedy",
              lambda: time_cli(bench.model, bench.prompts[0], n, bench.roofline(1)))  # fmt: skip
    phase.total()
    return 0


if __name__ == "__main__":
    sys.exit(main())
