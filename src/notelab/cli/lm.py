"""``notelab lm train|generate|eval|convert|sft|dpo``: parse, call notelab.lm, print.

    notelab lm train --preset llama-tiny --data stdlib|PATH --steps N --out DIR
    notelab lm generate --checkpoint DIR --prompt "def " --max-new-tokens 64 [--temperature --top-k --top-p --stream]
    notelab lm eval --checkpoint DIR [--data stdlib|PATH]          perplexity on the held-out split
    notelab lm convert --from-hf HF_DIR --out DIR  |  --to-hf DIR --out HF_DIR
    notelab lm sft --checkpoint DIR --data built-in|FILE.jsonl --out DIR
    notelab lm dpo --checkpoint DIR --data built-in|FILE.jsonl --out DIR [--beta 0.1]

Training verbs share ``notelab.cli.common``'s options (--steps --batch-size --lr --seed --device
--ckpt-every --log-every --resume --overwrite --no-progress --no-compile --allow-large). Cheap
checks (names, numbers, files, the run folder) run before any data is read or anything is written;
``train`` writes tokenizer.json, data.json and config.json before its first step, and ``--resume``
reuses that tokenizer and refuses other data flags or another preset.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from notelab.cli.common import (
    add_dtype_option,
    add_model_options,
    add_out_option,
    add_training_options,
    already_complete,
    apply_dtype,
    check_positive,
    check_text,
    check_training_options,
    complete_message,
    prepare_out,
    saved_step,
    seed_all,
    train_config_kwargs,
)
from notelab.cli.lm_serve import add_serve_parser
from notelab.core.errors import CheckpointError, ConfigError, DataError

if TYPE_CHECKING:  # imported lazily at run time, so `notelab --help` stays fast
    from notelab.cli.common import RunFolder
    from notelab.data.tokenizer import Tokenizer
    from notelab.lm.model import Llama
    from notelab.train import TrainConfig

BUILT_IN = "built-in"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("lm", help="LLaMA / Llama 3: pre-train, generate, evaluate, convert, SFT, DPO")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    t = verbs.add_parser("train", help="pre-train a Llama on text; writes model, tokenizer.json and logs")
    t.add_argument("--preset", default="llama-tiny", help="a LlamaConfig preset, e.g. llama-tiny, llama3-tiny")
    t.add_argument("--data", default="stdlib", help="'stdlib', a text file, or a directory of text files")
    t.add_argument("--seq-len", type=int, help="training window (default: min(256, the preset's max_seq_len))")
    t.add_argument("--warmup-steps", type=int, default=50)
    t.add_argument("--vocab-size", type=int, help="BPE vocabulary (default: the preset's vocab_size)")
    t.add_argument("--max-chars", type=int, help="use at most this many characters of training text")
    add_training_options(t, steps=1000, batch_size=16, lr=1e-3)
    t.set_defaults(func=train)

    g = verbs.add_parser("generate", help="generate text from a checkpoint")
    g.add_argument("--checkpoint", required=True, help="a run directory (model + tokenizer.json)")
    g.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    g.add_argument("--prompt-ids", help="a prompt as comma-separated token ids instead of text")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the Llama 3 chat template")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument(
        "--factual-nucleus",
        nargs=2,
        type=float,
        metavar=("DECAY", "FLOOR"),
        help="factual-nucleus sampling (Lee et al. 2022): top-p (--top-p, default 0.9) times DECAY per token of a "
        "sentence, at least FLOOR, reset after a token ending in . ! ? or a newline",
    )
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto")
    add_dtype_option(g)
    add_model_options(g)
    g.set_defaults(func=generate)

    e = verbs.add_parser("eval", help="perplexity on the held-out split of the run's text")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data", help="'stdlib', a file or a directory (default: what the run was trained on)")
    e.add_argument("--max-chars", type=int)
    e.add_argument("--seq-len", type=int, help="window length (default: min(256, max_seq_len))")
    e.add_argument("--max-windows", type=int, help="evaluate at most this many windows")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--device", default="auto")
    add_model_options(e)
    e.set_defaults(func=evaluate)

    c = verbs.add_parser("convert", help="Hugging Face LlamaForCausalLM <-> notelab checkpoint")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", help="a Hugging Face checkpoint directory (config.json + *.safetensors)")
    src.add_argument("--to-hf", help="a notelab checkpoint directory to write in the Hugging Face layout")
    add_out_option(c, help="the folder to write")
    add_model_options(c)
    c.set_defaults(func=convert)

    for verb, text in (
        ("sft", "supervised fine-tuning on the response tokens"),
        ("dpo", "direct preference optimization"),
    ):
        s = verbs.add_parser(verb, help=text)
        s.add_argument("--checkpoint", required=True, help="the model to start from (with tokenizer.json)")
        jsonl = '{"prompt", "response"}' if verb == "sft" else '{"prompt", "chosen", "rejected"}'
        s.add_argument("--data", default=BUILT_IN, help=f"'{BUILT_IN}' (stdlib docstrings) or a JSONL file of {jsonl}")
        s.add_argument("--n", type=int, help="built-in set: use this many examples")
        s.add_argument("--max-len", type=int, default=128, help="longest example in tokens")
        if verb == "dpo":
            s.add_argument("--beta", type=float, default=0.1)
        add_training_options(s, steps=200, batch_size=16, lr=1e-4 if verb == "sft" else 5e-5, log_every=None)
        s.set_defaults(func=sft if verb == "sft" else dpo)
    add_serve_parser(verbs)  # `notelab lm serve`, in notelab.cli.lm_serve


def train(args: argparse.Namespace) -> int:
    from notelab.data.tokenizer import Tokenizer
    from notelab.lm.config import LlamaConfig
    from notelab.lm.train import check_resume, mean_nll, prepare_data, pretrain
    from notelab.train import TrainConfig

    check_training_options(args)
    check_positive(seq_len=args.seq_len, vocab_size=args.vocab_size, max_chars=args.max_chars)
    if args.warmup_steps < 0:
        raise ConfigError(f"--warmup-steps: expected a number >= 0, got {args.warmup_steps}")
    base = LlamaConfig.from_name(args.preset)
    seq_len = args.seq_len or min(256, base.max_seq_len)
    if seq_len > base.max_seq_len:
        raise ConfigError(f"--seq-len: expected at most {args.preset}'s max_seq_len {base.max_seq_len}, got {seq_len}")
    folder = prepare_out(args.out, "lm train", resume=args.resume, overwrite=args.overwrite)
    out = folder.path
    vocab_size = args.vocab_size or base.vocab_size
    tokenizer = None
    start = saved_step(out) if folder.resume else None
    if folder.resume:
        # Same text, cut the same way, the same model: checked before any text is read.
        source = {"data": str(args.data), "max_chars": args.max_chars, "vocab_size": vocab_size, "seq_len": seq_len}
        check_resume(out, source, model_config=None)
        if (out / "tokenizer.json").is_file():
            tokenizer = Tokenizer.from_file(out)  # never a new one: the embeddings mean the run's tokens
            check_resume(out, {}, model_config=LlamaConfig.from_name(args.preset, vocab_size=tokenizer.vocab_size))
        elif start is not None:
            raise CheckpointError(f"{out}: a checkpoint at step {start} but no tokenizer.json to resume with")
        done = already_complete(out, args.steps)
        if done is not None:
            print(complete_message("lm train", done, args.steps))
            return 0
    seed_all(args.seed)
    t0 = time.perf_counter()
    data = prepare_data(args.data, vocab_size, args.max_chars, tokenizer=tokenizer)
    config = LlamaConfig.from_name(args.preset, vocab_size=data.tokenizer.vocab_size)
    print(f"data: {data.train.numel():,} train / {data.val.numel():,} val tokens, vocab {data.tokenizer.vocab_size}")
    train_config = TrainConfig(
        **train_config_kwargs(args),
        warmup_steps=min(args.warmup_steps, args.steps - 1),
        min_lr_ratio=0.1,
        weight_decay=0.1,
        betas=(0.9, 0.95),
    )
    with folder:
        result = pretrain(config, data, out, train_config, seq_len=seq_len)
    last = result.history[-1]["loss"] if result.history else float("nan")
    val = mean_nll(result.model, data.val, seq_len, max_windows=32)
    resumed = f" (resumed at step {start})" if start else ""
    print(
        f"trained {args.preset} for {result.step} steps{resumed} in {time.perf_counter() - t0:.1f} s: "
        f"train loss {last:.3f}, val loss {val:.3f} (perplexity {math.exp(val):.2f} on up to 32 windows)"
    )
    print(f"wrote {out}")
    return 0


def _load(args: argparse.Namespace) -> tuple[Llama, Tokenizer]:
    from notelab.core.runtime import get_device
    from notelab.lm.train import load_run

    return load_run(args.checkpoint, device=get_device(args.device), allow_large=args.allow_large)


def generate(args: argparse.Namespace) -> int:
    from notelab.lm.chat import chat_stop_tokens, encode_chat
    from notelab.lm.generate import ContextLimitWarning
    from notelab.lm.generate import generate as generate_tokens
    from notelab.lm.sampling import FactualNucleus

    check_positive(max_new_tokens=args.max_new_tokens)
    factual = None  # its numbers checked before the model loads; its sentence ends come from the tokenizer
    if args.factual_nucleus is not None:
        factual = FactualNucleus(0.9 if args.top_p is None else args.top_p, *args.factual_nucleus)
    if not args.prompt and args.prompt_ids is None:
        raise ConfigError("expected --prompt TEXT or --prompt-ids IDS, got neither")
    for text in args.prompt or ():
        check_text("--prompt", text)
    model, tokenizer = _load(args)
    if args.prompt_ids is not None:
        try:
            prompts = [[int(i) for i in args.prompt_ids.split(",")]]
        except ValueError as e:
            raise ConfigError(f"--prompt-ids: expected comma-separated integers, got {args.prompt_ids!r}") from e
    else:
        if args.chat:  # the template's control tokens come from code, never from the user's text
            prompts = [encode_chat(tokenizer, [{"role": "user", "content": p}]) for p in args.prompt]
        else:
            prompts = [tokenizer.encode(p, add_bos=tokenizer.bos_id is not None) for p in args.prompt]
    stops = chat_stop_tokens(tokenizer) if args.chat else [i for i in (tokenizer.eos_id,) if i is not None]
    top_p = args.top_p
    if factual is not None:
        top_p = FactualNucleus.for_tokenizer(tokenizer, factual.p, factual.decay, factual.floor)
    apply_dtype(model, args.dtype)
    shown: list[int] = []
    arrived = [0, 0.0]  # tokens so far, and when the second step's tokens were all in (then: steady decoding)

    def callback(row: int, token: int) -> None:
        arrived[0] += 1
        if arrived[0] == 2 * len(prompts):
            arrived[1] = time.perf_counter()
        if args.stream and len(prompts) == 1:
            # Decode the whole suffix so multi-token characters print whole.
            before = tokenizer.decode(shown)
            shown.append(token)
            sys.stdout.write(tokenizer.decode(shown)[len(before) :])
            sys.stdout.flush()

    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ContextLimitWarning)
        outs = generate_tokens(
            model,
            prompts,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=top_p,
            repetition_penalty=args.repetition_penalty,
            stop_tokens=stops,
            seed=args.seed,
            pad_id=tokenizer.pad_id or 0,
            callback=callback,
        )
    seconds = time.perf_counter() - t0
    if args.stream and len(prompts) == 1:
        print()
    else:
        for prompt, new in zip(prompts, outs):
            print(tokenizer.decode(prompt) + tokenizer.decode(new))
            if len(prompts) > 1:
                print("-" * 40)
    n = sum(len(o) for o in outs)
    print(_rate_line(n, len(outs), seconds, arrived[1] - t0 if arrived[1] else None), file=sys.stderr)
    for w in caught:  # one line each (a warning's default print is two, with our source line)
        if issubclass(w.category, ContextLimitWarning):
            print(f"note: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return 0


def _rate_line(tokens: int, rows: int, seconds: float, warm: float | None) -> str:
    """``[N tokens in S s, R tok/s]``, and the rate after the first two steps (``warm`` seconds in), which
    hold the prefill and, on a GPU, the one-time compilation and CUDA-graph capture of the decode step."""
    line = f"[{tokens} tokens in {seconds:.2f} s, {tokens / max(seconds, 1e-9):.1f} tok/s"
    later = tokens - 2 * rows
    if warm is not None and later > 0 and seconds > warm:
        line += f"; after the first two steps ({warm:.2f} s): {later / (seconds - warm):.1f} tok/s"
    return line + "]"


def evaluate(args: argparse.Namespace) -> int:
    from notelab.lm.train import load_data_info, mean_nll, prepare_data

    check_positive(**{k: getattr(args, k) for k in ("seq_len", "max_windows", "batch_size", "max_chars")})
    model, tokenizer = _load(args)
    info = load_data_info(args.checkpoint)
    source = args.data or info["data"]
    max_chars = args.max_chars if args.max_chars is not None else info.get("max_chars")
    seq_len = args.seq_len or min(256, model.config.max_seq_len)
    if seq_len > model.config.max_seq_len:
        raise ConfigError(
            f"--seq-len: expected at most the model's max_seq_len {model.config.max_seq_len}, got {seq_len}"
        )
    data = prepare_data(source, max_chars=max_chars, tokenizer=tokenizer)
    nll = mean_nll(model, data.val, seq_len, args.batch_size, args.max_windows)
    print(
        f"{source} val: {data.val.numel():,} tokens, seq_len {seq_len}: loss {nll:.4f} nats/token, "
        f"perplexity {math.exp(nll):.2f}"
    )
    return 0


def convert(args: argparse.Namespace) -> int:
    from notelab.core.io import atomic_write_bytes
    from notelab.lm import convert as conv
    from notelab.lm.model import Llama

    src = Path(args.from_hf or args.to_hf)
    if not src.is_dir():
        raise DataError(f"expected a checkpoint directory at {src}, found none")
    folder = prepare_out(args.out, "lm convert", overwrite=args.overwrite)
    out = folder.path
    if args.from_hf:
        model = conv.from_hf(src, allow_large=args.allow_large)
    else:
        model = Llama.from_pretrained(src, allow_large=args.allow_large)
    # Read now: with --overwrite, --out may be the source folder, which is moved aside when writing starts.
    tokenizer = (src / "tokenizer.json").read_bytes() if (src / "tokenizer.json").is_file() else None
    with folder:
        if args.from_hf:
            model.save_pretrained(out)
        else:
            conv.to_hf(model, out)
        if tokenizer is not None:
            atomic_write_bytes(out / "tokenizer.json", tokenizer)
    n = sum(p.numel() for p in model.parameters())
    print(f"converted {src} ({n:,} parameters) -> {out}")
    return 0


def _posttrain_setup(args: argparse.Namespace) -> tuple[Llama, Tokenizer, TrainConfig, RunFolder]:
    from notelab.train import TrainConfig

    check_training_options(args)
    check_positive(max_len=args.max_len, n=args.n)
    if args.data != BUILT_IN and not Path(args.data).is_file():
        raise DataError(f"--data: expected '{BUILT_IN}' or a JSONL file, got {args.data!r} (no such file)")
    folder = prepare_out(args.out, f"lm {args.verb}", resume=args.resume, overwrite=args.overwrite)
    model, tokenizer = _load(args)
    args.max_len = min(args.max_len, model.config.max_seq_len)  # examples are cut to the model's context
    config = TrainConfig(
        **{**train_config_kwargs(args), "log_every": args.log_every or max(1, args.steps // 20)},
        warmup_steps=min(10, args.steps - 1),
    )
    seed_all(args.seed)
    return model, tokenizer, config, folder


def _complete(args: argparse.Namespace, folder: RunFolder) -> bool:
    """``--resume`` of a run that already reached ``--steps``: say so (True) instead of training."""
    done = already_complete(folder.path, args.steps) if folder.resume else None
    if done is not None:
        print(complete_message(f"lm {args.verb}", done, args.steps))
    return done is not None


def _save(model: Llama, tokenizer: Tokenizer, out: str) -> None:
    model.save_pretrained(out)
    tokenizer.save(Path(out))


def sft(args: argparse.Namespace) -> int:
    from notelab.lm.data import load_sft_jsonl, stdlib_sft_examples
    from notelab.lm.posttrain import sft as run_sft

    model, tokenizer, config, folder = _posttrain_setup(args)
    if _complete(args, folder):
        return 0
    examples = stdlib_sft_examples("train", args.n) if args.data == BUILT_IN else load_sft_jsonl(args.data)
    with folder:
        result = run_sft(model, tokenizer, examples, config, max_len=args.max_len)
        _save(result.model, tokenizer, args.out)
    print(
        f"SFT on {len(examples)} examples, {result.step} steps: loss {result.history[-1]['loss']:.3f}; wrote {args.out}"
    )
    return 0


def dpo(args: argparse.Namespace) -> int:
    from notelab.lm.data import load_preference_jsonl, stdlib_preference_pairs
    from notelab.lm.posttrain import dpo as run_dpo

    check_positive(beta=args.beta)
    model, tokenizer, config, folder = _posttrain_setup(args)
    if _complete(args, folder):
        return 0
    pairs = stdlib_preference_pairs("train", args.n) if args.data == BUILT_IN else load_preference_jsonl(args.data)
    with folder:
        result = run_dpo(model, tokenizer, pairs, config, beta=args.beta, max_len=args.max_len)
        _save(result.model, tokenizer, args.out)
    last = result.history[-1]
    print(
        f"DPO on {len(pairs)} pairs, {result.step} steps: loss {last['loss']:.3f}, "
        f"reward margin {last['reward_margin']:.3f}, accuracy {last['reward_accuracy']:.2f}; wrote {args.out}"
    )
    return 0
