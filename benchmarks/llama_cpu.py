"""notelab's Llama against transformers' LlamaForCausalLM on CPU: same config, same weights, same run.

The notelab model is built from a preset with random weights, written with ``to_hf`` and loaded
by transformers (``attn_implementation="sdpa"``), so both hold identical tensors. Before timing,
the logits are compared (max abs difference) and the greedy tokens of both must agree.

    python benchmarks/llama_cpu.py                       # llama-small (12.6M params), fp32
    python benchmarks/llama_cpu.py --preset llama-tiny --threads 1 --new-tokens 32

Table: forward ms for a (batch, seq) block, and batch-1 greedy generation tokens/s (prompt of
``--prompt`` tokens, ``--new-tokens`` new ones; transformers' ``generate`` with its default
dynamic cache, ours with the static cache, eager). Ratio > 1 means ours is faster.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections.abc import Callable, Sequence

import torch

from notelab.lm import Llama, LlamaConfig, generate, to_hf


def best_times(fns: Sequence[Callable[[], object]], repeats: int) -> list[float]:
    """Best wall time of each function, the functions interleaved so that machine load hits all alike."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)

    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig.from_name(args.preset)
    ours = Llama(config).eval()
    with tempfile.TemporaryDirectory() as d:
        to_hf(ours, d)
        hf = transformers.LlamaForCausalLM.from_pretrained(d, attn_implementation="sdpa").eval()
    hf.generation_config.eos_token_id = None  # random weights: never stop early
    hf.generation_config.pad_token_id = 0

    x = torch.randint(1, config.vocab_size, (args.batch, args.seq))
    prompt = torch.randint(1, config.vocab_size, (1, args.prompt))
    with torch.inference_mode():
        diff = (ours(x) - hf(x).logits).abs().max().item()
        hf_tokens = hf.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)[0, args.prompt :].tolist()
    our_tokens = generate(ours, prompt, args.new_tokens, static=True)[0]
    assert our_tokens == hf_tokens, "greedy tokens differ between notelab and transformers"

    with torch.inference_mode():
        fwd_ours, fwd_hf = best_times([lambda: ours(x), lambda: hf(x)], args.repeats)
        gen_ours, gen_dyn, gen_hf = best_times(
            [
                lambda: generate(ours, prompt, args.new_tokens, static=True),
                lambda: generate(ours, prompt, args.new_tokens),
                lambda: hf.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False),
            ],
            args.repeats,
        )

    n = args.new_tokens
    rows = [
        (f"forward ms (B={args.batch}, T={args.seq})", 1e3 * fwd_ours, 1e3 * fwd_hf, fwd_hf / fwd_ours),
        (f"generate tok/s (static cache, P={args.prompt})", n / gen_ours, n / gen_hf, gen_hf / gen_ours),
        (f"generate tok/s (dynamic cache, P={args.prompt})", n / gen_dyn, n / gen_hf, gen_hf / gen_dyn),
    ]
    params = sum(p.numel() for p in ours.parameters())
    print(f"# {args.preset}: {params / 1e6:.1f}M params, fp32, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")  # fmt: skip
    print(f"# max |logits ours - transformers| = {diff:.2e}; greedy tokens identical")
    print(f"| {'measure':<42} | {'notelab':>9} | {'transformers':>12} | {'ours faster x':>13} |")
    print(f"|{'-' * 44}|{'-' * 11}|{'-' * 14}|{'-' * 15}|")
    for name, a, b, r in rows:
        print(f"| {name:<42} | {a:>9.1f} | {b:>12.1f} | {r:>13.2f} |")
    return {"rows": rows, "max_abs_logit_diff": diff}


if __name__ == "__main__":
    main()
