"""``notelab flows train | sample | likelihood``: parse, call notelab.flows, print.

    notelab flows train --model nice|realnvp|cnf|fm|rf --data moons|digits|PATH --out runs/nice-moons
        [--steps N --batch-size B --lr LR --hidden H --depth L --arch auto|mlp|multiscale --n-bins K ...]
    notelab flows sample --checkpoint runs/fm-moons --solver euler --steps 10 --n 512 --out samples.png
    notelab flows likelihood --checkpoint runs/nice-digits --data digits --split test   (alias: eval)

Images are dequantised with ``--n-bins`` levels (default 17 for the embedded digits, 256 for
image folders and arrays) and their log-likelihood is reported in bits/dim; for a toy density the
exact test log-likelihood of the true density is printed beside the model's. RealNVP on images
is the multi-scale conv flow (``--arch auto``); ``--arch mlp`` couples the flattened image. Every check runs
before anything is written.
"""

from __future__ import annotations

import argparse
import time

from notelab.cli.common import (
    add_model_options,
    add_training_options,
    already_complete,
    check_out_file,
    check_positive,
    check_training_options,
    complete_message,
    prepare_out,
    seed_all,
    train_config_kwargs,
)
from notelab.core.errors import ConfigError

MODELS = ("nice", "realnvp", "cnf", "fm", "rf")
SOLVERS = ("euler", "heun", "rk4", "dopri5")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("flows", help="normalizing flows: NICE, RealNVP, CNF, flow matching, rectified flow")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    t = verbs.add_parser("train", help="train a flow; writes config.json + model.safetensors + flow.json")
    t.add_argument("--model", required=True, choices=MODELS)
    t.add_argument("--data", required=True, help="moons, 8gaussians, ..., digits, an image folder or a .npy/.npz")
    add_training_options(t, steps=2000, batch_size=256, lr=1e-3)
    t.add_argument(
        "--hidden",
        type=int,
        help="width of the conditioners / the vector field MLP (default 128; multiscale: 32 conv channels)",
    )
    t.add_argument(
        "--depth",
        type=int,
        help="hidden layers of each conditioner MLP (default 3) or residual blocks of its conv net (multiscale: 1)",
    )
    t.add_argument(
        "--arch",
        default="auto",
        choices=("auto", "mlp", "multiscale"),
        help="nice / realnvp: couplings of the flattened image (mlp) or RealNVP's multi-scale conv couplings "
        "(auto: multiscale for realnvp on images)",
    )
    t.add_argument("--n-bins", type=int, help="levels of image data (default: 17 digits, 256 other images)")
    t.add_argument("--n", type=int, default=8192, help="points drawn from a toy density")
    t.add_argument("--image-size", type=int, help="resize images to this size")
    t.add_argument("--channels", type=int, help="1 or 3 channels for an image folder")
    t.add_argument(
        "--divergence",
        choices=("exact", "hutchinson"),
        help="cnf training (default: exact for points, hutchinson for images, where exact costs one pass per pixel)",
    )
    t.add_argument("--solver-steps", type=int, default=8, help="cnf training: RK4 steps through the ODE")
    t.add_argument("--path", default="ot", choices=("ot", "linear", "vp"), help="fm: the probability path")
    t.add_argument("--pairing", default="independent", choices=("independent", "ot"), help="fm / rf: OT-CFM pairing")
    t.set_defaults(func=train)

    s = verbs.add_parser("sample", help="sample a trained flow; writes an image grid or a scatter PNG")
    s.add_argument("--checkpoint", required=True, help="run folder written by `notelab flows train`")
    s.add_argument("--solver", default="dopri5", choices=SOLVERS, help="continuous flows: the ODE solver")
    s.add_argument("--steps", type=int, default=20, help="steps of a fixed-step solver (1: one-step sampling)")
    s.add_argument("--n", type=int, default=512, help="number of samples")
    s.add_argument("--out", required=True, help="output PNG")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto")
    add_model_options(s)
    s.set_defaults(func=sample)

    e = verbs.add_parser("likelihood", aliases=["eval"], help="test log-likelihood (bits/dim for images)")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data", required=True, help="the data set to score (as for train)")
    e.add_argument("--split", default="test", choices=("all", "train", "test"))
    e.add_argument("--n", type=int, default=10000, help="points drawn from a toy density (seed 1: unseen in training)")
    e.add_argument("--image-size", type=int, help="resize images to this size (as in training)")
    e.add_argument("--channels", type=int, help="1 or 3 channels for an image folder")
    e.add_argument("--max-examples", type=int, default=None, help="score at most this many examples")
    e.add_argument("--solver", default="dopri5", choices=SOLVERS, help="continuous flows: the ODE solver")
    e.add_argument("--steps", type=int, default=20, help="steps of a fixed-step solver")
    e.add_argument("--divergence", default="exact", choices=("exact", "hutchinson"))
    e.add_argument("--device", default="auto")
    add_model_options(e)
    e.set_defaults(func=likelihood)


def _n_bins(given: int | None, data: str, kind: str) -> int | None:
    if kind == "points":
        if given is not None:
            raise ConfigError(f"--n-bins: applies to image data, {data!r} holds points")
        return None
    if given is not None:
        if given < 2:
            raise ConfigError(f"--n-bins: expected an integer >= 2, got {given}")
        return given
    return 17 if data == "digits" else 256


def _load(args: argparse.Namespace, split: str, n: int, seed: int):  # noqa: ANN202 (an ArrayDataset)
    from notelab.data import load_dataset

    given = {k: v for k, v in (("image_size", args.image_size), ("channels", args.channels)) if v is not None}
    return load_dataset(args.data, n=n, seed=seed, split=split, **given)


def train(args: argparse.Namespace) -> int:
    from notelab.flows.train import FlowSpec, coupling_arch, train_flow
    from notelab.train import TrainConfig

    check_training_options(args)
    check_positive(hidden=args.hidden, depth=args.depth, n=args.n, solver_steps=args.solver_steps)
    folder = prepare_out(args.out, "flows train", resume=args.resume, overwrite=args.overwrite)
    train_config = TrainConfig(**train_config_kwargs(args))
    if folder.resume:
        done = already_complete(folder.path, train_config.steps)
        if done is not None:
            print(complete_message("flows train", done, train_config.steps))
            return 0
    dataset = _load(args, "train", args.n, args.seed)
    # Conv couplings cost far more per unit of width than MLP ones: the multi-scale flow's defaults are
    # sized to train on a CPU in minutes (GPU runs pass --hidden 64 --depth 2 or more).
    arch = coupling_arch(FlowSpec(model=args.model, arch=args.arch), dataset.sample_shape)["arch"]
    small = args.model in ("nice", "realnvp") and arch == "multiscale"
    spec = FlowSpec(
        model=args.model,
        n_bins=_n_bins(args.n_bins, args.data, dataset.kind),
        hidden=args.hidden or (32 if small else 128),
        depth=args.depth or (1 if small else 3),
        arch=args.arch,
        solver_steps=args.solver_steps,
        divergence=args.divergence or ("exact" if dataset.kind == "points" else "hutchinson"),
        path=args.path,
        pairing=args.pairing,
    )
    seed_all(train_config.seed)
    t0 = time.perf_counter()
    with folder:
        train_flow(spec, dataset.x, train_config, out_dir=folder.path)
    print(
        f"trained {args.model} on {args.data} ({len(dataset)} examples) in {time.perf_counter() - t0:.1f} s; "
        f"wrote {args.out}"
    )
    return 0


def _solver(args: argparse.Namespace):  # noqa: ANN202 (a Solver)
    from notelab.flows.continuous import Solver

    check_positive(steps=args.steps)
    return Solver(args.solver, args.steps)


def sample(args: argparse.Namespace) -> int:
    import torch

    from notelab.core.runtime import get_device
    from notelab.eval import save_image_grid, scatter_png
    from notelab.flows.train import draw, load_flow

    out = check_out_file(args.out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out: expected a .png path, got {args.out!r}")
    if args.n < 1:
        raise ConfigError(f"--n: expected at least 1 sample, got {args.n}")
    solver = _solver(args)
    device = get_device(args.device)
    model, spec = load_flow(args.checkpoint, device=device, allow_large=args.allow_large)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    t0 = time.perf_counter()
    x, nfe = draw(model, args.n, solver, generator)
    seconds = time.perf_counter() - t0
    x = x.cpu()
    out.parent.mkdir(parents=True, exist_ok=True)
    if x.ndim == 2:
        scatter_png(x[:, :2], out, title=f"{spec.model}, {args.n} samples, {nfe} NFE", lim=None)
    else:
        save_image_grid(x.clamp(-1, 1), out)
    print(f"{spec.model}: {args.n} samples, {nfe} network evaluations, {seconds:.2f} s; wrote {out}")
    return 0


def likelihood(args: argparse.Namespace) -> int:
    from notelab.core.runtime import get_device
    from notelab.flows.train import evaluate, load_flow

    solver = _solver(args)
    check_positive(n=args.n, max_examples=args.max_examples)
    device = get_device(args.device)
    model, spec = load_flow(args.checkpoint, device=device, allow_large=args.allow_large)
    dataset = _load(args, args.split, args.n, 1)
    x = dataset.x[: args.max_examples].to(device)
    t0 = time.perf_counter()
    result = evaluate(model, x, spec.n_bins, solver, args.divergence)
    log_p = result["log_likelihood"]
    line = f"{spec.model} on {args.data} ({len(x)} examples): log-likelihood {log_p:.4f} nats"
    if spec.n_bins is not None:
        line += f", {result['bits_per_dim']:.4f} bits/dim"
    if dataset.density is not None and dataset.density.has_log_prob:
        line += f" (true density: {float(dataset.density.log_prob(x.cpu()).mean()):.4f})"
    print(f"{line}; {time.perf_counter() - t0:.1f} s")
    return 0
