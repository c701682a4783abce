"""``notelab seq train`` and ``notelab seq translate``: parse, call notelab.seq, print.

    notelab seq train --model transformer|lstm|gru|rnn --task copy|reverse|adding|stdlib-doc --out DIR
        [--length L --steps N --batch-size B --lr LR --d-model D --layers N --time-budget S --device DEV]
    notelab seq translate --checkpoint DIR --input "def f(x): ..." [--beam 4] [--allow-large]

For stdlib-doc, ``translate`` maps Python source to a one-sentence summary; for the synthetic
tasks the input and output are space-separated token ids. Every check runs before training
starts, so bad input leaves no file behind.
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

from notelab.cli.common import (
    add_model_options,
    add_training_options,
    already_complete,
    check_positive,
    check_same_settings,
    check_text,
    check_training_options,
    complete_message,
    prepare_out,
    seed_all,
    train_config_kwargs,
)
from notelab.core.errors import ConfigError, ShapeError, unknown_name

if TYPE_CHECKING:
    from notelab.cli.common import RunFolder

MODELS = ("transformer", "lstm", "gru", "rnn")
TASKS = ("copy", "reverse", "adding", "stdlib-doc")
MAX_LENGTH = 4096  # longest synthetic source accepted (positions of the Transformer)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("seq", help="Transformer and RNN / LSTM / GRU encoder-decoders on seq2seq tasks")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    t = verbs.add_parser("train", help="train a seq2seq model on a task; writes config.json + model.safetensors")
    t.add_argument("--model", required=True, help="transformer, lstm, gru or rnn")
    t.add_argument("--task", required=True, help="copy, reverse, adding or stdlib-doc")
    t.add_argument("--length", type=int, default=16, help="source length L of a synthetic task")
    t.add_argument("--warmup", type=int, default=100, help="warmup steps")
    t.add_argument("--d-model", type=int, default=128, help="Transformer width; RNNs get the same parameter count")
    t.add_argument("--layers", type=int, default=2, help="encoder and decoder layers")
    t.add_argument("--dropout", type=float, default=0.1)
    t.add_argument("--time-budget", type=float, help="stop after this many seconds of training")
    t.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary for stdlib-doc")
    t.add_argument("--max-train", type=int, help="stdlib-doc: keep this many training functions")
    add_training_options(t, steps=1000, batch_size=32, lr=1e-3, log_every=None)
    t.set_defaults(func=train)

    s = verbs.add_parser("translate", help="decode one input with a trained model")
    s.add_argument("--checkpoint", required=True, help="run directory written by `notelab seq train`")
    s.add_argument("--input", required=True, help="Python source (stdlib-doc) or space-separated token ids")
    s.add_argument("--beam", type=int, default=1, help="beam size; 1 is greedy")
    s.add_argument("--device", default="cpu")
    add_model_options(s)
    s.set_defaults(func=translate)


def train(args: argparse.Namespace) -> int:
    from notelab.seq.factory import check_model_size, model_config
    from notelab.seq.tasks import make_task
    from notelab.seq.training import evaluate, train_seq
    from notelab.train import TrainConfig

    if args.model not in MODELS:
        raise unknown_name("model", args.model, MODELS)
    if args.task not in TASKS:
        raise unknown_name("task", args.task, TASKS)
    if args.task != "stdlib-doc" and not 1 <= args.length <= MAX_LENGTH:
        raise ShapeError(f"--length: expected a source length in 1..{MAX_LENGTH}, got {args.length}")
    if args.steps < 1 or args.batch_size < 1:
        raise ConfigError(f"--steps / --batch-size: expected integers >= 1, got {args.steps} / {args.batch_size}")
    if args.time_budget is not None and not args.time_budget > 0:
        raise ConfigError(f"--time-budget: expected a positive number of seconds, got {args.time_budget}")
    check_training_options(args)
    check_positive(vocab_size=args.vocab_size, max_train=args.max_train)
    if args.warmup < 0:
        raise ConfigError(f"--warmup: expected a number of steps >= 0, got {args.warmup}")
    # The model's config and size are checked now, before the task is built or a file written (the
    # synthetic tasks' vocabularies are a few ids; stdlib-doc's is --vocab-size); build_model checks
    # the exact size again once the task is known.
    vocab = args.vocab_size if args.task == "stdlib-doc" else 8
    config = model_config(args.model, vocab, 8, d_model=args.d_model, n_layers=args.layers, dropout=args.dropout)
    check_model_size(config)
    folder = prepare_out(args.out, "seq train", resume=args.resume, overwrite=args.overwrite)
    config = TrainConfig(
        **{**train_config_kwargs(args), "log_every": args.log_every or max(1, min(50, args.steps))},
        warmup_steps=args.warmup,
    )
    if folder.resume:
        done = already_complete(folder.path, args.steps)
        if done is not None:
            print(complete_message("seq train", done, args.steps))
            return 0
    extra = {"vocab_size": args.vocab_size, "max_train": args.max_train} if args.task == "stdlib-doc" else {}
    seed_all(args.seed)
    t0 = time.perf_counter()
    with folder:  # stdlib-doc caches its tokenizer in the run folder
        task = make_task(args.task, length=args.length, batch_size=args.batch_size, run_dir=folder.path, **extra)
        check_same_task(folder, task)
        run = train_seq(
            args.model,
            task,
            folder.path,
            config,
            d_model=args.d_model,
            n_layers=args.layers,
            dropout=args.dropout,
            time_budget=args.time_budget,
        )
    scores = evaluate(run.model, task, n_examples=256)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in scores.items() if k != "n")
    print(
        f"trained {args.model} ({run.params:,} params) on {args.task} for {run.steps} steps in "
        f"{time.perf_counter() - t0:.1f} s; {shown}; wrote {args.out}"
    )
    return 0


def check_same_task(folder: RunFolder, task: object) -> None:
    """A resumed run trains on the task it started with; task.json is written before the first step."""
    from notelab.seq.factory import check_task_file
    from notelab.seq.tasks import save_task

    if folder.resume and (folder.path / "task.json").is_file():
        check_same_settings(folder.path / "task.json", check_task_file(folder.path), task.spec())
    save_task(task, folder.path)


def translate(args: argparse.Namespace) -> int:
    from notelab.seq.training import translate as run_translate

    check_text("--input", args.input)

    print(
        run_translate(
            args.checkpoint, args.input, beam_size=args.beam, device=args.device, allow_large=args.allow_large
        )
    )
    return 0
