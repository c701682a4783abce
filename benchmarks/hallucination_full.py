"""The full ``notelab reproduce hallucination`` run with the data where the machine has it.

On CUDA the claim's ``FULL_GPU`` budget: a 69.6M-parameter LLaMA (d 640, 12 layers, 8,192-token BPE)
pre-trained through ``notelab.train.fit`` (bf16 autocast + torch.compile, its defaults on CUDA) for
1,000 steps of 32 x 512 tokens on the whole train split of the standard library, then asked 800
stdlib-facts questions; detectors, factual-nucleus sampling and retrieval as the claim describes;
TruthfulQA MC1/MC2 (all 790 questions, the paper's QA primer) and HaluEval general (2,000 rows) from
``--data-root``. Writes ``<out>/hallucination/result.json``, ``<out>/index.html`` and prints the tables.
Measured on one H200 (2026-11-29): 164 s in all, 77 s of it pre-training; the claim held.

    python benchmarks/hallucination_full.py --data-root _data --out "$OUT"          # one H200, ~3 min
    python benchmarks/hallucination_full.py --smoke --data-root ../shared/data --out /tmp/h   # CPU, tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from notelab.reproduce import hallucination as claim
from notelab.reproduce.base import Progress
from notelab.reproduce.report import device_name, write_report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--data-root", default=str(claim.DEFAULT_DATA_ROOT), help="holds truthfulqa/ and halueval/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="override the budget's pre-training steps")
    p.add_argument("--smoke", action="store_true", help="the QUICK budget (a CPU check of this script)")
    args = p.parse_args()
    s = claim.QUICK if args.smoke else claim.FULL_GPU if torch.cuda.is_available() else claim.FULL
    if args.steps:
        s = dataclasses.replace(s, steps=args.steps)
    out = Path(args.out)
    t0 = time.perf_counter()
    result = claim.run(
        out / claim.NAME,
        quick=args.smoke,
        seed=args.seed,
        progress=Progress(claim.NAME, stream=sys.stderr),
        settings=s,
        data_root=args.data_root,
    )
    # what `notelab reproduce` records beside a claim's result (so the report and --pool read it alike)
    result = dataclasses.replace(result, seed=args.seed, quick=args.smoke, device=device_name())
    (out / claim.NAME / "result.json").write_text(json.dumps(dataclasses.asdict(result), indent=2, default=str) + "\n")
    write_report([result], out, quick=args.smoke, failures={})
    print(f"verdict: {result.verdict} ({time.perf_counter() - t0:.0f} s)\n{result.summary}\n")
    for t in result.tables:
        print(f"## {t.title}\n| " + " | ".join(t.columns) + " |")
        for row in t.rows:
            print("| " + " | ".join(str(c) for c in row) + " |")
        if t.note:
            print(f"\n{t.note}")
        print()
    for c in result.checks:
        print(f"- [{c.role}] {c.group} / {c.name}: {c.verdict}; {c.interval_text()}")
    keep = ("parameters", "train_tokens", "val_loss", "train_seconds", "facts", "device", "verdicts")
    print({k: result.settings[k] for k in keep}, result.part_seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
