"""Serving benchmark: N concurrent streaming `openai` clients against `notelab lm serve`.

Starts ``notelab lm serve`` in a child process on a checkpoint (``--checkpoint DIR``), or on a
Llama of a preset's shape with random weights (``--preset llama3.2-1b``: the weights are written
to a temporary checkpoint with a small BPE tokenizer padded with placeholder tokens up to the
model's vocabulary, so every id the random model emits has text). Then, with ``AsyncOpenAI``:

1. one warm-up request (on CUDA the engine compiles and captures its decode step here);
2. one client alone: its tokens/s (completion tokens over the request's wall time);
3. ``--clients`` clients at once, each streaming a different random prompt of ``--prompt-len``
   token ids, greedy, ``--max-tokens`` new tokens: aggregate tokens/s (all completion tokens
   over the time from the first request sent to the last one done), its ratio to (2), time to
   first token (request sent -> first text chunk) and inter-token latency (gaps between
   successive chunks, one token each) at p50 / p99;
4. (unless ``--no-check``) each request's text against ``notelab.lm.generate`` alone on the same
   prompt in this process (greedy; equal in float32, bf16 rounding can flip near-ties), and
   generate's own batch-1 tokens/s for comparison with (2);
5. ``--disconnect K``: the clients once more, K of them closing their connection after 4 chunks:
   the server's ``/health`` count of sequences must fall to the others' while they still run (the
   leavers' slots freed), and the others' texts must equal those of (3).

    python benchmarks/serve_bench.py --preset llama-tiny --clients 8 --max-tokens 64       # CPU, a minute
    python benchmarks/serve_bench.py --preset llama3.2-1b --clients 64 --max-tokens 256 --disconnect 8   # H200

Token counts come from the server's ``usage`` (``stream_options.include_usage``). The server runs
as ``python -m notelab``, so notelab must be importable (``pip install -e .`` or ``PYTHONPATH=src``).

On a machine without the serving stack (the device machine has no starlette / uvicorn / openai /
pydantic), carry wheels: on a machine with the package index,
``pip download --only-binary=:all: --python-version 3.X -d wheels starlette uvicorn openai``
(3.X: the device's Python; with anyio, idna, sniffio, typing_extensions, click, h11, httpx2,
httpcore2, truststore, jiter, pydantic, pydantic_core, annotated_types and typing_inspection, 17
wheels, 6 MB for 3.11 on x86-64), then there
``pip install --no-index --find-links wheels starlette uvicorn openai``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch
from openai import AsyncOpenAI

from notelab.data.tokenizer import Tokenizer
from notelab.lm import generate
from notelab.lm.config import LlamaConfig
from notelab.lm.model import Llama
from notelab.lm.train import load_run

CORPUS = ["def add(a, b):\n    return a + b\n", "the quick brown fox jumps over the lazy dog", "import os, sys"]


@dataclass
class Timing:
    """One streamed request: when it was sent, when each text chunk came, how many tokens it made."""

    index: int  # the prompt's
    sent: float
    chunks: list[float] = field(default_factory=list)
    done: float = 0.0
    tokens: int = 0
    text: str = ""


def random_checkpoint(preset: str, folder: Path, dtype: torch.dtype) -> None:
    """A randomly initialised ``preset`` Llama with a BPE tokenizer padded to its vocabulary."""
    config = LlamaConfig.from_name(preset)
    tok = Tokenizer.train(CORPUS * 20, vocab_size=300)
    # placeholder tokens up to the model's vocabulary: every id a random model emits decodes to text
    tok.backend.add_tokens([f"<r{i}>" for i in range(config.vocab_size - tok.vocab_size)])
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Llama(config)
    model.to(dtype).save_pretrained(folder)
    tok.save(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, port: int, args: argparse.Namespace) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "notelab", "lm", "serve", "--checkpoint", str(checkpoint), "--port", str(port)]
    cmd += ["--model-name", "bench", "--max-batch", str(max(args.clients, 1)), "--log-level", "warning"]
    cmd += ["--dtype", args.dtype, "--device", args.device, "--max-len", str(args.prompt_len + args.max_tokens)]
    return subprocess.Popen(cmd)


async def wait_ready(client: AsyncOpenAI, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await client.models.list()
            return
        except Exception:  # noqa: BLE001 - not up yet
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start (exit code {proc.poll()})") from None
            await asyncio.sleep(0.5)


def make_client(port: int) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=3600)


async def one(
    client: AsyncOpenAI, index: int, prompt: list[int], max_tokens: int, leave_after: int | None = None
) -> Timing:
    """One streamed greedy completion; ``leave_after``: close the connection after that many chunks."""
    # time.monotonic is CLOCK_MONOTONIC on Linux: one clock for every client process
    t = Timing(index, time.monotonic())
    stream = await client.completions.create(
        model="bench",
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        now = time.monotonic()
        if chunk.usage is not None:
            t.tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].text:
            t.chunks.append(now)
            t.text += chunk.choices[0].text
        if leave_after is not None and len(t.chunks) >= leave_after:
            await stream.close()
            break
    t.done = time.monotonic()
    return t


def health_active(port: int) -> int:
    """The server's count of sequences it holds (its /health)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as r:
        return json.load(r)["active"]


def leave_midway(port: int, prompts: list[list[int]], max_tokens: int, leaving: int) -> dict:
    """All clients again, the first ``leaving`` closing their connection after 4 chunks: the others'
    texts, and how soon after the last one left the server held only the others' sequences."""

    async def go() -> dict:
        client = make_client(port)
        stayers = asyncio.gather(*(one(client, i, p, max_tokens) for i, p in enumerate(prompts) if i >= leaving))
        await asyncio.gather(*(one(client, i, prompts[i], max_tokens, leave_after=4) for i in range(leaving)))
        t0, freed = time.monotonic(), None
        while freed is None and not stayers.done():
            if await asyncio.to_thread(health_active, port) <= len(prompts) - leaving:
                freed = time.monotonic() - t0
            await asyncio.sleep(0.002)
        return {"texts": [t.text for t in await stayers], "freed_s": freed}

    return asyncio.run(go())


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))] if xs else float("nan")


def client_process(
    port: int, prompts: list[tuple[int, list[int]]], max_tokens: int, barrier: object, results: object
) -> None:
    """One client process: its share of the streams, all started when every process is ready."""

    async def go() -> list[Timing]:
        client = make_client(port)
        barrier.wait()
        return list(await asyncio.gather(*(one(client, i, p, max_tokens) for i, p in prompts)))

    results.put(asyncio.run(go()))


def many_clients(port: int, prompts: list[list[int]], max_tokens: int, procs: int) -> list[Timing]:
    """The streams spread over ``procs`` processes, so the clients' own parsing is not the bottleneck."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(procs), ctx.Queue()
    shares = [list(enumerate(prompts))[i::procs] for i in range(procs)]
    workers = [ctx.Process(target=client_process, args=(port, sh, max_tokens, barrier, results)) for sh in shares]
    for w in workers:
        w.start()
    timings = [t for _ in workers for t in results.get()]
    for w in workers:
        w.join()
    return timings


async def warm(port: int, proc: subprocess.Popen, prompt: list[int], max_tokens: int) -> Timing:
    client = make_client(port)
    await wait_ready(client, proc)
    await one(client, 0, prompt, 4)  # warm-up: compile / capture
    return await one(client, 0, prompt, max_tokens)


def drive(args: argparse.Namespace, port: int, proc: subprocess.Popen, prompts: list[list[int]]) -> dict:
    single = asyncio.run(warm(port, proc, prompts[0], args.max_tokens))
    if args.client_procs > 1:
        many = many_clients(port, prompts, args.max_tokens, args.client_procs)
    else:

        async def together() -> list[Timing]:
            client = make_client(port)
            return list(await asyncio.gather(*(one(client, i, p, args.max_tokens) for i, p in enumerate(prompts))))

        many = asyncio.run(together())
    left = leave_midway(port, prompts, args.max_tokens, args.disconnect) if args.disconnect else None
    wall = max(t.done for t in many) - min(t.sent for t in many)
    ttft = [t.chunks[0] - t.sent for t in many if t.chunks]
    itl = [b - a for t in many for a, b in zip(t.chunks, t.chunks[1:])]
    single_tps = single.tokens / (single.done - single.sent)
    total = sum(t.tokens for t in many)
    texts = [t.text for t in sorted(many, key=lambda t: t.index)]
    if left is not None:
        stayed = texts[args.disconnect :]
        left = {
            "disconnected": args.disconnect,
            "others_unchanged": f"{sum(a == b for a, b in zip(left['texts'], stayed))}/{len(stayed)}",
            # None: the others had finished before the server let go of the leavers' sequences
            "slots_freed_while_others_ran_after_s": left["freed_s"],
        }
    return {
        "clients": len(many),
        "client_procs": args.client_procs,
        "max_tokens": args.max_tokens,
        "prompt_len": args.prompt_len,
        "single_tokens_per_s": single_tps,
        "single_ttft_ms": 1e3 * (single.chunks[0] - single.sent) if single.chunks else float("nan"),
        "aggregate_tokens": total,
        "aggregate_s": wall,
        "aggregate_tokens_per_s": total / wall,
        "ratio": total / wall / single_tps,
        "ttft_ms_p50": 1e3 * pct(ttft, 50),
        "ttft_ms_p99": 1e3 * pct(ttft, 99),
        "itl_ms_p50": 1e3 * pct(itl, 50),
        "itl_ms_p99": 1e3 * pct(itl, 99),
        # above 1: a reader fell behind and got several tokens in one chunk, or a token ended mid-character
        "tokens_per_chunk": total / max(1, sum(len(t.chunks) for t in many)),
        **(left or {}),
        "texts": texts,
    }


def check(checkpoint: Path, prompts: list[list[int]], texts: list[str], args: argparse.Namespace) -> dict:
    """How many served texts equal ``generate`` alone on the same prompt (greedy, the server's dtype),
    and generate's own tokens/s over those calls (the first, which may compile, left out)."""
    from notelab.core.runtime import get_device

    model, tok = load_run(checkpoint, device=get_device(args.device))
    if args.dtype != "auto":
        model.to(getattr(torch, args.dtype))
    elif model.embed_tokens.weight.is_cuda:
        model.to(torch.bfloat16)
    model.eval()
    stops = [tok.eos_id] if tok.eos_id is not None else []
    same, tokens, seconds = 0, 0, 0.0
    for k, (p, text) in enumerate(zip(prompts, texts)):
        t0 = time.perf_counter()
        ids = generate(model, [p], args.max_tokens, stop_tokens=stops)[0]
        if k:
            tokens, seconds = tokens + len(ids), seconds + time.perf_counter() - t0
        same += tok.decode([i for i in ids if i < tok.vocab_size]) == text
    out = {"identical_to_generate": f"{same}/{len(texts)}"}
    if seconds:
        out["generate_alone_tokens_per_s"] = tokens / seconds
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="a notelab checkpoint with tokenizer.json")
    src.add_argument("--preset", default="llama-tiny", help="random weights of this LlamaConfig preset")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument(
        "--client-procs", type=int, help="processes the clients are spread over (default: 1 up to 8 clients, else 4)"
    )
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--disconnect",
        type=int,
        default=0,
        help="then run the clients again with this many leaving after 4 chunks: the others' texts must not change",
    )
    ap.add_argument("--no-check", dest="check", action="store_false", help="skip the comparison with generate")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    args.client_procs = args.client_procs or (1 if args.clients <= 8 else 4)

    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            checkpoint = Path(args.checkpoint)
        else:
            checkpoint = Path(tmp) / args.preset
            dtype = torch.bfloat16 if torch.cuda.is_available() and args.dtype == "auto" else torch.float32
            random_checkpoint(args.preset, checkpoint, dtype)
            torch.cuda.empty_cache()  # the server process gets the memory
        vocab = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
        rng = random.Random(0)
        # ids past the special tokens; a different prompt per client
        prompts = [[rng.randrange(8, min(vocab, 300)) for _ in range(args.prompt_len)] for _ in range(args.clients)]
        port = free_port()
        proc = start_server(checkpoint, port, args)
        try:
            result = drive(args, port, proc, prompts)
        finally:
            proc.terminate()
            proc.wait(30)
        texts = result.pop("texts")
        if args.check:
            result.update(check(checkpoint, prompts, texts, args))

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"notelab lm serve, {args.checkpoint or args.preset}, {device}, {args.clients} streaming clients")
    single = result["single_tokens_per_s"]
    print(f"  one client alone:    {single:10.1f} tokens/s  (TTFT {result['single_ttft_ms']:.1f} ms)")
    print(
        f"  {args.clients} clients at once: {result['aggregate_tokens_per_s']:10.1f} tokens/s  "
        f"= {result['ratio']:.2f}x one client ({result['aggregate_tokens']} tokens in {result['aggregate_s']:.2f} s)"
    )
    print(f"  time to first token: p50 {result['ttft_ms_p50']:.1f} ms, p99 {result['ttft_ms_p99']:.1f} ms")
    print(
        f"  inter-token latency: p50 {result['itl_ms_p50']:.2f} ms, p99 {result['itl_ms_p99']:.2f} ms "
        f"({result['tokens_per_chunk']:.2f} tokens per streamed chunk)"
    )
    if "identical_to_generate" in result:
        print(f"  identical to generate alone (greedy): {result['identical_to_generate']}")
    if args.disconnect:
        freed = result["slots_freed_while_others_ran_after_s"]
        when = "NOT while the others ran" if freed is None else f"{freed * 1e3:.0f} ms after they left"
        print(
            f"  {args.disconnect} clients left after 4 chunks: their slots freed {when}; "
            f"the others' texts unchanged {result['others_unchanged']}"
        )
    if "generate_alone_tokens_per_s" in result:
        print(f"  generate alone, no server, batch 1: {result['generate_alone_tokens_per_s']:.1f} tokens/s")
    if args.json:
        Path(args.json).write_text(json.dumps({**vars(args), "hardware": device, **result}, indent=2))


if __name__ == "__main__":
    main()
