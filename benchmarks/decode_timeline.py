"""Where one batched ``generate`` call's time goes on the GPU: its kernels on a timeline (one GPU, about a minute).

    python benchmarks/decode_timeline.py [--batch 32] [--greedy] [--prompt 64] [--new-tokens 256]

Llama-3.2-1B shape, random weights, bf16, as ``decode_defaults.py`` builds it. Two warm-up calls of
``generate(model, prompts, N)`` (sampled: temperature 0.8, top-p 0.95, unless ``--greedy``), then a third under
torch.profiler (CUDA activity only), which prints: the span from the first kernel to the last and the time the
device was busy; the idle gaps (all, and those over 20 us with the kernels on either side); the decode steps,
from one output projection (the only kernels over 80 us in a step) to the next: their median, extremes, first
and last; and what ran before the first of them (the weight refresh and the prompts' forward), by kernel name.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from decode_defaults import SAMPLED, Bench
from notelab.lm import generate

LONG_US = 80  # a kernel this long in a decode step is its output projection


def timeline(kernels: list) -> None:  # noqa: ANN001 - torch.profiler's events
    """Print the summary of the module doc for ``kernels`` (CUDA events, any order)."""
    ev = sorted(kernels, key=lambda e: e.time_range.start)
    t0, t1 = ev[0].time_range.start, max(e.time_range.end for e in ev)
    busy = sum(e.time_range.elapsed_us() for e in ev)
    print(f"events {len(ev)}, span {(t1 - t0) / 1e3:.2f} ms, busy (sum) {busy / 1e3:.2f} ms")
    gaps, end = [], ev[0].time_range.end
    for i in range(1, len(ev)):
        if ev[i].time_range.start > end:
            gaps.append((ev[i].time_range.start - end, i))
        end = max(end, ev[i].time_range.end)
    long = [(g, i) for g, i in gaps if g > 20]
    print(f"idle: {sum(g for g, _ in gaps) / 1e3:.2f} ms in {len(gaps)} gaps; over 20 us: "
          f"{sum(g for g, _ in long) / 1e3:.2f} ms in {len(long)}")  # fmt: skip
    for g, i in sorted(gaps, reverse=True)[:12]:
        at = (ev[i].time_range.start - t0) / 1e3
        print(f"  gap {g:8.1f} us at {at:8.2f} ms: after {ev[i - 1].name[:60]!r} before {ev[i].name[:60]!r}")
    starts = [e.time_range.start for e in ev if e.time_range.elapsed_us() > LONG_US]
    if not starts:
        return
    steps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    print(f"kernels over {LONG_US} us: {len(starts)}; first at {(starts[0] - t0) / 1e3:.2f} ms, last at "
          f"{(starts[-1] - t0) / 1e3:.2f} ms; after the last: {(t1 - starts[-1]) / 1e3:.2f} ms")  # fmt: skip
    if steps:
        first, last = [round(s, 1) for s in steps[:5]], [round(s, 1) for s in steps[-5:]]
        print(f"from one to the next (us): median {statistics.median(steps):.1f}, min {min(steps):.1f}, max "
              f"{max(steps):.1f}; first 5 {first}, last 5 {last}")  # fmt: skip
    names: dict[str, float] = {}
    for e in ev:
        if e.time_range.start >= starts[0]:
            break
        names[e.name[:70]] = names.get(e.name[:70], 0.0) + e.time_range.elapsed_us()
    print(f"before the first ({(starts[0] - t0) / 1e3:.2f} ms), by kernel name (us):")
    for n, us in sorted(names.items(), key=lambda kv: -kv[1])[:15]:
        print(f"  {us:9.1f}  {n}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
    args = p.parse_args(argv)
    bench = Bench("llama3.2-1b", args.prompt, args.new_tokens, args.batch, False)
    bench.card()
    bench.build()
    kw = {} if args.greedy else SAMPLED
    prompts = bench.prompts[: args.batch]
    for _ in range(2):
        generate(bench.model, prompts, args.new_tokens, **kw)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        generate(bench.model, prompts, args.new_tokens, **kw)
        torch.cuda.synchronize()
    timeline([e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA])
    return 0


if __name__ == "__main__":
    sys.exit(main())
