"""``notelab peft train|estimate|merge``: parameter-efficient fine-tuning of a notelab Llama.

    notelab peft train --base DIR --method lora --r 8 [--data built-in|FILE.jsonl] --out DIR
    notelab peft estimate --model qwen1.5-7b|config.json --method lora --dtype bf16 --optimizer adamw
                          --batch 1 --seq 2048 [--world-size 8]
    notelab peft merge --base DIR --adapter DIR --out DIR

``train`` fine-tunes on (prompt, response) JSONL (built in: stdlib function signature -> docstring)
through ``notelab.train.fit`` with the response-masked loss. Its checkpoints hold the adapter and
its optimizer state only; the frozen base is named in ``base.json`` by path and SHA-256 (checked
on ``--resume``), never copied. The adapter is written in Hugging Face PEFT's layout to
``DIR/adapter`` (loadable by ``peft`` on the transformers Llama). Shared training options as every
training verb (``notelab.cli.common``).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from notelab.cli.common import (
    add_model_options,
    add_out_option,
    add_training_options,
    already_complete,
    check_positive,
    check_training_options,
    complete_message,
    prepare_out,
    seed_all,
    train_config_kwargs,
)
from notelab.core.errors import CheckpointError, ConfigError, DataError, unknown_name

BUILT_IN = "built-in"
METHODS = ("lora", "ia3", "houlsby", "pfeiffer", "prompt", "prefix", "bitfit")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("peft", help="parameter-efficient fine-tuning: LoRA, IA3, adapters, prompt/prefix")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    t = verbs.add_parser("train", help="fine-tune adapters on a frozen Llama; writes DIR/adapter (PEFT layout)")
    t.add_argument("--base", required=True, help="a notelab Llama run or checkpoint folder (with tokenizer.json)")
    t.add_argument("--method", default="lora", help=", ".join(METHODS))
    t.add_argument("--r", type=int, default=8, help="LoRA rank")
    t.add_argument("--lora-alpha", type=float, default=16.0)
    t.add_argument("--lora-dropout", type=float, default=0.0)
    t.add_argument("--target-modules", default="all-linear", help="comma-separated names, or a regex, or all-linear")
    t.add_argument("--bottleneck", type=int, default=16, help="adapter width (houlsby / pfeiffer)")
    t.add_argument("--num-virtual-tokens", type=int, default=8, help="prompt / prefix length")
    t.add_argument("--data", default=BUILT_IN, help=f"'{BUILT_IN}' (stdlib docstrings) or a JSONL of prompt/response")
    t.add_argument("--n", type=int, help="built-in set: use this many examples")
    t.add_argument("--max-len", type=int, default=128, help="longest example in tokens")
    add_training_options(t, steps=200, batch_size=16, lr=1e-3, log_every=None)
    t.set_defaults(func=train)

    e = verbs.add_parser("estimate", help="memory of full vs parameter-efficient fine-tuning, as a table")
    e.add_argument("--model", default="qwen1.5-7b", help="a preset (qwen1.5-7b, llama3-8b, ...) or a config.json")
    e.add_argument("--method", default="lora", help="full, lora, prefix, adapter, prompt, ia3")
    e.add_argument("--dtype", default="bf16", help="bf16, fp16, fp32")
    e.add_argument("--optimizer", default="adamw", help="adamw, sgd-momentum, sgd")
    e.add_argument("--batch", type=int, default=1)
    e.add_argument("--seq", type=int, default=2048)
    e.add_argument("--r", type=int, default=8)
    e.add_argument("--num-virtual-tokens", type=int, default=20)
    e.add_argument("--target-modules", default="all-linear", help="LoRA: comma-separated linears, or all-linear")
    e.add_argument("--world-size", type=int, default=1, help="GPUs sharding the model states (FSDP); bytes per GPU")
    e.set_defaults(func=estimate)

    m = verbs.add_parser("merge", help="merge a LoRA / IA3 adapter into its base; writes a plain Llama")
    m.add_argument("--base", required=True, help="the base Llama folder")
    m.add_argument("--adapter", required=True, help="an adapter folder (adapter_config.json + safetensors)")
    add_out_option(m, help="the folder to write")
    add_model_options(m)
    m.set_defaults(func=merge)


def adapter_config(args: argparse.Namespace):  # noqa: ANN201 - a notelab.peft config
    """The ``notelab.peft`` config of ``--method`` and its options."""
    from notelab.peft import (
        BitFitConfig,
        IA3Config,
        LoraConfig,
        PrefixTuningConfig,
        PromptTuningConfig,
        houlsby,
        pfeiffer,
    )

    if args.method not in METHODS:
        raise unknown_name("--method", args.method, METHODS)
    targets = args.target_modules
    if targets != "all-linear" and "," in targets or targets.isidentifier():
        targets = [t for t in targets.split(",") if t]
    make = {
        "lora": lambda: LoraConfig(
            r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=targets
        ),  # fmt: skip
        "ia3": IA3Config,
        "houlsby": lambda: houlsby(args.bottleneck),
        "pfeiffer": lambda: pfeiffer(args.bottleneck),
        "prompt": lambda: PromptTuningConfig(num_virtual_tokens=args.num_virtual_tokens),
        "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=args.num_virtual_tokens),
        "bitfit": BitFitConfig,
    }
    return make[args.method]()


def base_identity(base: Path) -> dict[str, str]:
    """The frozen base named by path and the SHA-256 of its weights (not copied into the run)."""
    from notelab.peft.files import file_sha256

    weights = base / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"--base: expected {weights}, found none")
    return {"path": str(base.resolve()), "sha256": file_sha256(weights)}


def train(args: argparse.Namespace) -> int:
    from notelab.lm.data import load_sft_jsonl, stdlib_sft_examples
    from notelab.lm.posttrain import sft
    from notelab.lm.train import load_run
    from notelab.peft import count_parameters, get_peft_model, save_adapter
    from notelab.train import TrainConfig

    check_training_options(args)
    check_positive(max_len=args.max_len, n=args.n)
    config = adapter_config(args)
    if args.data != BUILT_IN and not Path(args.data).is_file():
        raise DataError(f"--data: expected '{BUILT_IN}' or a JSONL file, got {args.data!r} (no such file)")
    base_dir = Path(args.base)
    folder = prepare_out(args.out, "peft train", resume=args.resume, overwrite=args.overwrite)
    identity = base_identity(base_dir)
    if folder.resume and (folder.path / "base.json").is_file():
        saved = json.loads((folder.path / "base.json").read_text())
        if saved.get("sha256") != identity["sha256"]:
            raise CheckpointError(f"--resume: the run's base {saved.get('path')} had SHA-256 {saved.get('sha256')}, "
                                  f"--base {base_dir} has {identity['sha256']}")  # fmt: skip
    done = already_complete(folder.path, args.steps, model_file="adapter/adapter_model.safetensors")
    if folder.resume and done is not None:
        print(complete_message("peft train", done, args.steps))
        return 0
    from notelab.core.runtime import get_device

    model, tokenizer = load_run(base_dir, device=get_device(args.device), allow_large=args.allow_large)
    args.max_len = min(args.max_len, model.config.max_seq_len)
    seed_all(args.seed)
    peft = get_peft_model(model, config)
    trainable, total = count_parameters(peft)
    examples = stdlib_sft_examples("train", args.n) if args.data == BUILT_IN else load_sft_jsonl(args.data)
    train_config = TrainConfig(
        **{**train_config_kwargs(args), "log_every": args.log_every or max(1, args.steps // 20)},
        warmup_steps=min(10, args.steps - 1),
    )
    with folder:
        (folder.path / "base.json").write_text(json.dumps(identity, indent=2) + "\n")
        result = sft(peft, tokenizer, examples, train_config, max_len=args.max_len)
        save_adapter(result.model, folder.path / "adapter", names="hf-causal-lm", base_model_name_or_path=str(base_dir))
    print(
        f"{args.method}: {trainable:,} of {total:,} parameters trained ({100 * trainable / total:.3f}%), "
        f"{result.step} steps on {len(examples)} examples, loss {result.history[-1]['loss']:.3f}; "
        f"wrote {folder.path / 'adapter'}"
    )
    return 0


def estimate(args: argparse.Namespace) -> int:
    from notelab.core.config import load_json
    from notelab.lm.loss import default_chunk
    from notelab.peft.estimate import PRESETS, MethodSpec, estimate, format_table, shape_from_hf

    check_positive(batch=args.batch, seq=args.seq, r=args.r, num_virtual_tokens=args.num_virtual_tokens,
                   world_size=args.world_size)  # fmt: skip
    if args.model in PRESETS:
        shape = PRESETS[args.model]
    elif args.model.endswith(".json") and Path(args.model).is_file():
        shape = shape_from_hf(load_json(args.model), args.model)
    else:
        raise ConfigError(f"--model: expected a preset ({', '.join(PRESETS)}) or a config.json, got {args.model!r}")
    rows = {}
    for method in dict.fromkeys(["full", args.method]):
        targets = () if args.target_modules == "all-linear" else tuple(t for t in args.target_modules.split(",") if t)
        spec = MethodSpec(method, r=args.r, num_virtual_tokens=args.num_virtual_tokens, lora_targets=targets)
        rows[f"{args.model} {method}"] = estimate(
            shape, spec, dtype=args.dtype, optimizer=args.optimizer, batch=args.batch, seq=args.seq,
            loss_chunk=default_chunk(shape.vocab_size), world_size=args.world_size,
        )  # fmt: skip
    where = f", per GPU of {args.world_size} (FSDP)" if args.world_size > 1 else ""
    print(f"{args.dtype}, {args.optimizer}, batch {args.batch}, seq {args.seq}{where}; fit's default path "
          "(compiled, chunked loss); GB = 1e9 bytes")  # fmt: skip
    print(format_table(rows))
    return 0


def merge(args: argparse.Namespace) -> int:
    from notelab.lm.train import load_run
    from notelab.peft import load_adapter

    folder = prepare_out(args.out, "peft merge", overwrite=args.overwrite)
    model, tokenizer = load_run(args.base, allow_large=args.allow_large)
    peft = load_adapter(model, args.adapter)
    merged = peft.merge_and_unload()
    with folder:
        merged.save_pretrained(folder.path)
        shutil.copyfile(Path(args.base) / "tokenizer.json", folder.path / "tokenizer.json")
    print(f"merged {args.adapter} into {args.base}; wrote {folder.path}")
    return 0
