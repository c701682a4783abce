"""``notelab oad train|eval|stream``: online action detection from the command line.

    notelab oad train --model oadtr|trn|lstm|gru|transformer --data digits|basicmotions|FOLDER --out DIR
        [--preset tiny|small|official --steps N --batch-size B --lr LR --device DEV]
    notelab oad eval --checkpoint DIR --data digits|basicmotions|FOLDER [--split test]
    notelab oad stream --checkpoint DIR [--input FILE.npy|FILE.txt|-]

``--data`` names an embedded set of real recordings (``digits``: scikit-learn's handwritten digits
written row by row; ``basicmotions``: UEA BasicMotions, when aeon or sktime is installed) or a
folder of ``features/<video>.npy`` + ``labels/<video>.npy`` + ``classes.json``. The official
OadTR pickles are read with ``--features-pickle F --labels-pickle L --data-info JSON`` instead
(train uses the ``train`` sessions, eval the ``test`` ones). ``stream`` reads one frame per line
(numbers separated by spaces or commas) from a file or stdin, or a ``(frames, D)`` ``.npy``
file, and prints each frame's top class and probabilities as soon as the frame arrives.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from notelab.cli.common import (
    add_model_options,
    add_training_options,
    already_complete,
    check_training_options,
    complete_message,
    prepare_out,
    seed_all,
    train_config_kwargs,
)
from notelab.core.errors import CheckpointError, ConfigError, ShapeError, unknown_name

MODELS = ("oadtr", "trn", "lstm", "gru", "transformer")
PRESETS = ("tiny", "small", "official")


def _add_data_options(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument(
        "--data", default=default, help="digits, basicmotions, or a folder (features/, labels/, classes.json)"
    )
    p.add_argument("--features-pickle", help="official layout: {video: {'rgb', 'flow'}} features")
    p.add_argument("--labels-pickle", help="official layout: {video: {'anno'}} labels (a .pickle or the anno zip)")
    p.add_argument("--labels-member", help="the pickle inside --labels-pickle when it is a zip")
    p.add_argument("--data-info", help="official data_info JSON (splits, class names)")
    p.add_argument("--dataset", default="THUMOS", help="the data set of --data-info (THUMOS, TVSERIES, HDD)")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("oad", help="online action detection: OadTR, TRN, LSTM / GRU, causal Transformer")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    t = verbs.add_parser("train", help="train a detector; writes config.json + model.safetensors")
    t.add_argument("--model", required=True, help=", ".join(MODELS))
    t.add_argument("--preset", default="small", help=", ".join(PRESETS))
    t.add_argument("--window", type=int, help="T past frames (default: the preset's)")
    t.add_argument("--future-weight", type=float, default=0.5, help="weight of the anticipation loss")
    _add_data_options(t, "digits")
    add_training_options(t, steps=500, batch_size=64, lr=1e-3, log_every=50)
    t.set_defaults(func=train)

    e = verbs.add_parser("eval", help="per-frame mAP, mcAP and future-step mAP of a trained detector")
    e.add_argument("--checkpoint", required=True, help="folder written by `notelab oad train`")
    e.add_argument("--model", help="check the checkpoint holds this model")
    e.add_argument("--split", default="test", help="train or test (embedded and official data)")
    e.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda, cuda:N")
    e.add_argument("--batch-size", type=int, default=512)
    _add_data_options(e, "digits")
    add_model_options(e)
    e.set_defaults(func=evaluate)

    s = verbs.add_parser("stream", help="score frames as they arrive (one feature vector per line, or .npy)")
    s.add_argument("--checkpoint", required=True, help="folder written by `notelab oad train`")
    s.add_argument("--model", help="check the checkpoint holds this model")
    s.add_argument("--input", default="-", help="a .npy (frames, D) file, a text file, or - for stdin")
    s.add_argument("--device", default="cpu")
    add_model_options(s)
    s.set_defaults(func=stream)


def load_data(args: argparse.Namespace, split: str) -> Any:
    from notelab.data.streams import digits_streams, load_official, load_streams

    official = (args.features_pickle, args.labels_pickle, args.data_info)
    if any(official):
        if not all(official):
            raise ConfigError("--features-pickle, --labels-pickle, --data-info: expected all three, got only some")
        return load_official(*official, dataset=args.dataset, split=split, labels_member=args.labels_member)
    if args.data in ("digits", "basicmotions"):
        if split not in ("train", "test"):
            raise unknown_name("split", split, ("train", "test"))
        return digits_streams(split) if args.data == "digits" else load_streams(args.data, split)
    return load_streams(args.data)


def train(args: argparse.Namespace) -> int:
    from notelab.oad import build_model, evaluate_detector, model_config, train_detector
    from notelab.train import TrainConfig

    if args.model not in MODELS:
        raise unknown_name("model", args.model, MODELS)
    if args.preset not in PRESETS:
        raise unknown_name("preset", args.preset, PRESETS)
    if not 0.0 <= args.future_weight:
        raise ConfigError(f"--future-weight: expected a number >= 0, got {args.future_weight}")
    check_training_options(args)
    overrides = {} if args.window is None else {"window": args.window}
    data = load_data(args, "train")  # read and checked before anything is written
    model_config(args.model, data, args.preset, **overrides)
    folder = prepare_out(args.out, "oad train", resume=args.resume, overwrite=args.overwrite)
    if folder.resume:
        done = already_complete(folder.path, args.steps)
        if done is not None:
            print(complete_message("oad train", done, args.steps))
            return 0
    seed_all(args.seed)
    model = build_model(args.model, data, args.preset, seed=args.seed, **overrides)
    from notelab.oad.training import windows_for

    windows_for(model, data, training=True, seed=args.seed)  # a video shorter than the window fails here
    config = TrainConfig(**train_config_kwargs(args))
    t0 = time.perf_counter()
    with folder:
        run = train_detector(model, data, config, future_weight=args.future_weight)
        run.model.save_pretrained(folder.path)
    seconds = time.perf_counter() - t0
    n = sum(p.numel() for p in run.model.parameters())
    msg = (
        f"trained {args.model} ({n:,} params) on {data.name} for {run.step} steps in {seconds:.1f} s; wrote {args.out}"
    )
    if args.data in ("digits", "basicmotions") and not args.features_pickle:
        scores = evaluate_detector(run.model, load_data(args, "test"))
        msg += f"; test mAP {scores['mAP']:.4f} mcAP {scores['mcAP']:.4f}"
    print(msg)
    return 0


def _load(args: argparse.Namespace) -> Any:
    from notelab.core.runtime import get_device
    from notelab.oad import load_detector

    args.device = get_device(args.device)
    model = load_detector(args.checkpoint, device=args.device)
    if args.model is not None:
        if args.model not in MODELS:
            raise unknown_name("model", args.model, MODELS)
        kind = getattr(model.config, "cell", None) or {"causal_transformer": "transformer"}.get(
            model.model_type, model.model_type
        )
        if kind != args.model:
            raise CheckpointError(f"--model: expected a {args.model} checkpoint, {args.checkpoint} holds {kind}")
    return model


def evaluate(args: argparse.Namespace) -> int:
    from notelab.oad import evaluate_detector

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: expected an integer >= 1, got {args.batch_size}")
    model = _load(args)
    data = load_data(args, args.split)
    scores = evaluate_detector(model, data, batch_size=args.batch_size, device=args.device)
    line = f"{data.name}: {scores['frames']} frames, per-frame mAP {scores['mAP']:.4f}, mcAP {scores['mcAP']:.4f}"
    if "future_mAP" in scores:
        line += "; future-step mAP " + " ".join(f"{m:.4f}" for m in scores["future_mAP"])
    print(line)
    return 0


def _text_frames(lines: Any, d_in: int, source: str) -> Any:
    """Yield one feature vector per non-empty line, checked as it arrives."""
    import numpy as np

    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            values = np.array([float(v) for v in line.replace(",", " ").split()], dtype=np.float32)
        except ValueError as e:
            raise ShapeError(f"{source} line {i}: expected numbers separated by spaces or commas ({e})") from e
        if values.shape != (d_in,):
            raise ShapeError(f"{source} line {i}: expected {d_in} features for this model, got {values.size}")
        yield values


def stream(args: argparse.Namespace) -> int:
    import numpy as np

    from notelab.oad import OnlineDetector

    model = _load(args)
    d_in = model.config.d_in
    if args.input != "-" and args.input.endswith(".npy"):
        frames = np.load(args.input, allow_pickle=False)
        if frames.ndim != 2 or frames.shape[1] != d_in:
            raise ShapeError(f"{args.input}: expected (frames, {d_in}) features for this model, got {frames.shape}")
        source: Any = iter(frames)
        handle = None
    else:
        handle = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")  # noqa: SIM115
        source = _text_frames(handle, d_in, "stdin" if args.input == "-" else args.input)
    det = OnlineDetector(model, device=args.device)
    names = [str(c) for c in det.classes]
    print("frame\ttop\t" + "\t".join(f"p{n}" for n in names), flush=True)
    try:
        for t, f in enumerate(source):
            p = det.step(f)
            top = det.classes[int(p.argmax())]
            print(f"{t}\t{top}\t" + "\t".join(f"{v:.4f}" for v in p.tolist()), flush=True)
    finally:
        if handle is not None and handle is not sys.stdin:
            handle.close()
    return 0
