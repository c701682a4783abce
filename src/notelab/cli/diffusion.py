"""``notelab diffusion train|sample|likelihood`` and ``notelab sde ...``: parse, call notelab.diffusion, print.

    notelab diffusion train --data digits --out runs/ddpm-digits [--steps N --batch-size B --lr LR
        --ema-decay D --ckpt-every N --resume --device DEV --seed S]
    notelab diffusion sample --checkpoint runs/ddpm-digits --sampler ddim --steps 50 --eta 0 --n 64
        --out grid.png [--spacing leading --seed 0]

Score SDEs (Song et al. 2021) on the same run folders: ``notelab sde`` is the same three verbs with the
SDE note's defaults (``--sde vp``, ``--sampler pc``, 500 steps):

    notelab sde train --data moons --out runs/vp-moons [--sde vp|ve|subvp --weighting likelihood
        --importance --sigma-min 0.01 --sigma-max 50]
    notelab sde sample --checkpoint runs/vp-moons [--sampler pc|em|rd|ode --steps 500] --out s.png
        [--snr 0.16 --n-corrector 1 --ode-method dopri5 --rtol 1e-5 --atol 1e-5]
    notelab sde likelihood --checkpoint runs/vp-moons --data moons [--n 256 --divergence exact]

A DDPM run (no --sde) takes the SDE samplers and the likelihood as the VP SDE it discretises.
Every check runs before anything is written, so bad input leaves no file behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import MISSING
from pathlib import Path
from typing import TYPE_CHECKING

from notelab.cli.common import (
    add_model_options,
    add_training_options,
    already_complete,
    check_out_file,
    check_positive,
    check_same_settings,
    check_training_options,
    complete_message,
    prepare_out,
    seed_all,
    train_config_kwargs,
)
from notelab.core.errors import ConfigError, unknown_name

if TYPE_CHECKING:
    import torch

# Training options handed to TrainConfig when given; the defaults below are DDPM's (EMA weights,
# a short warmup), TrainConfig's own for the rest.
_EXTRA_OPTS = ("ema_decay", "precision")
TRAIN_DEFAULTS = {
    "steps": 4000,
    "batch_size": 128,
    "lr": 1e-3,
    "warmup_steps": 100,
    "min_lr_ratio": 0.1,
    "ema_decay": 0.999,
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """``notelab diffusion`` (DDPM / DDIM defaults) and ``notelab sde`` (the score-SDE note's defaults): the
    same three verbs on the same run folders, so one model takes every sampler."""
    p = subparsers.add_parser("diffusion", help="DDPM training and DDPM / DDIM sampling")
    _add_verbs(p, sde="none", sampler="ddim", steps=50)
    p = subparsers.add_parser("sde", help="score SDEs (VE / VP / sub-VP): train, PC / EM / ODE sampling, likelihood")
    _add_verbs(p, sde="vp", sampler="pc", steps=500)


def _add_verbs(p: argparse.ArgumentParser, sde: str, sampler: str, steps: int) -> None:
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    t = verbs.add_parser(
        "train", help="train a DDPM or score-SDE model on a data set; writes config.json + model.safetensors"
    )
    t.add_argument("--data", required=True, help="digits, moons, 8gaussians, ..., an image folder or a .npy/.npz")
    t.add_argument("--ema-decay", type=float)
    t.add_argument("--precision", help="auto, fp32, bf16, fp16")
    none = dict.fromkeys(("steps", "batch_size", "lr", "seed", "device", "ckpt_every", "log_every"))
    add_training_options(t, **none)  # None: DDPM's default below, or TrainConfig's
    t.add_argument("--image-size", type=int, help="resize an image folder to this size")
    t.add_argument("--channels", type=int, help="1 or 3 channels for an image folder")
    t.add_argument("--beta-schedule", default="linear", help="linear, scaled_linear, cosine")
    t.add_argument("--num-train-timesteps", type=int, default=1000)
    t.add_argument("--prediction-type", default="epsilon", help="epsilon, sample, v_prediction")
    t.add_argument("--sde", default=sde, help="none (DDPM loss), ve, vp, subvp (continuous score matching)")
    t.add_argument("--sigma-min", type=float, default=0.01, help="VE SDE's smallest noise scale")
    t.add_argument("--sigma-max", type=float, default=50.0, help="VE SDE's largest noise scale")
    t.add_argument("--weighting", default="eps", help="score matching weight: eps or likelihood")
    t.add_argument("--importance", action="store_true", help="importance-sample t (with --weighting likelihood)")
    t.set_defaults(func=train)

    s = verbs.add_parser(
        "sample", help="sample a trained model (DDPM, DDIM or an SDE sampler); writes an image grid or scatter PNG"
    )
    s.add_argument("--checkpoint", required=True, help="run directory written by `notelab diffusion train`")
    s.add_argument(
        "--sampler", default=sampler, help="ddim, ddpm (all T steps); SDE samplers: pc, em, rd (reverse diffusion), ode"
    )
    s.add_argument(
        "--steps", type=int, default=steps, help="DDIM steps S, 1..T; steps of an SDE / fixed-step ODE sampler"
    )
    s.add_argument("--eta", type=float, default=0.0, help="DDIM noise scale: 0 deterministic, 1 DDPM-like")
    s.add_argument("--spacing", default="leading", help="leading, trailing, linspace, quadratic")
    s.add_argument("--n", type=int, default=64, help="number of samples")
    s.add_argument("--out", required=True, help="output PNG")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto")
    s.add_argument("--progress", action="store_true")
    add_sde_sampling_options(s)
    add_model_options(s)
    s.set_defaults(func=sample)

    lk = verbs.add_parser("likelihood", help="exact log-likelihood (nats, bits/dim) by the probability-flow ODE")
    lk.add_argument("--checkpoint", required=True, help="run directory written by `notelab diffusion train`")
    lk.add_argument("--data", required=True, help="the data set to score (its held-out split)")
    lk.add_argument("--n", type=int, default=128, help="number of held-out samples")
    lk.add_argument("--divergence", default="exact", help="exact or hutchinson")
    lk.add_argument("--rtol", type=float, default=1e-5)
    lk.add_argument("--atol", type=float, default=1e-5)
    lk.add_argument(
        "--n-bins",
        type=int,
        default=0,
        help="bins over [-1, 1] for bits/dim of images (0: 16 for digits, 17 levels 1/8 apart; else 256)",
    )
    lk.add_argument("--seed", type=int, default=0)
    lk.add_argument("--device", default="auto")
    add_model_options(lk)
    lk.set_defaults(func=likelihood)


def add_sde_sampling_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("--snr", type=float, default=0.16, help="PC sampler: Langevin signal-to-noise ratio")
    s.add_argument("--n-corrector", type=int, default=1, help="PC sampler: Langevin steps per step")
    s.add_argument("--ode-method", default="dopri5", help="ODE sampler: dopri5 (adaptive), euler, heun, rk4")
    s.add_argument("--rtol", type=float, default=1e-5, help="ODE sampler: dopri5 relative tolerance")
    s.add_argument("--atol", type=float, default=1e-5, help="ODE sampler: dopri5 absolute tolerance")


def train(args: argparse.Namespace) -> int:
    from notelab.core.checkpoint import CONFIG_NAME
    from notelab.core.config import config_to_dict, load_json, save_config
    from notelab.data import load_dataset
    from notelab.diffusion.pipeline import DiffusionConfig, DiffusionModel, train_diffusion
    from notelab.train import TrainConfig

    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps: expected at least 1 training step, got {args.steps}")
    check_training_options(args)
    folder = prepare_out(args.out, "diffusion train", resume=args.resume, overwrite=args.overwrite)
    opts = {**TRAIN_DEFAULTS, **train_config_kwargs(args)}
    opts.update({k: getattr(args, k) for k in _EXTRA_OPTS if getattr(args, k) is not None})
    train_config = TrainConfig(**opts)
    if folder.resume:
        done = already_complete(folder.path, train_config.steps)
        if done is not None:
            print(complete_message("diffusion train", done, train_config.steps))
            return 0
    given = {k: v for k, v in (("image_size", args.image_size), ("channels", args.channels)) if v is not None}
    dataset = load_dataset(args.data, **given)
    diffusion_config = DiffusionConfig.for_shape(
        dataset.sample_shape,
        beta_schedule=args.beta_schedule,
        num_train_timesteps=args.num_train_timesteps,
        prediction_type=args.prediction_type,
        sde=args.sde,
        sigma_min=args.sigma_min,
        sigma_max=args.sigma_max,
        weighting=args.weighting,
        importance=args.importance,
    )
    config_path = folder.path / CONFIG_NAME
    if folder.resume and config_path.is_file():  # the same weights under another schedule would resume silently
        # a run saved before a field existed had that field's default
        defaults = {f.name: f.default for f in dataclasses.fields(DiffusionConfig) if f.default is not MISSING}
        saved = {**defaults, **load_json(config_path)}
        check_same_settings(config_path, saved, config_to_dict(diffusion_config))
    seed_all(train_config.seed)
    t0 = time.perf_counter()
    with folder:
        save_config(diffusion_config, config_path, model_type=DiffusionModel.model_type)  # what a resume checks
        train_diffusion(dataset, folder.path, train_config, diffusion_config)
    print(f"trained {args.data} ({len(dataset.x)} samples) in {time.perf_counter() - t0:.1f} s; wrote {args.out}")
    return 0


def sample(args: argparse.Namespace) -> int:
    import torch

    from notelab.core.runtime import get_device
    from notelab.diffusion.pipeline import DiffusionModel
    from notelab.diffusion.samplers import ODE_METHODS, SDE_SAMPLERS

    out = check_out_file(args.out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out: expected a .png path, got {args.out!r}")
    if args.n < 1:
        raise ConfigError(f"--n: expected at least 1 sample, got {args.n}")
    device = get_device(args.device)
    # Config first: a bad --steps is reported before the (larger) weights are read.
    config = DiffusionModel.load_config(args.checkpoint)
    if args.sampler in SDE_SAMPLERS:
        check_positive(snr=args.snr, rtol=args.rtol, atol=args.atol, steps=args.steps)
        if args.n_corrector < 0:
            raise ConfigError(f"--n-corrector: expected >= 0, got {args.n_corrector}")
        if args.ode_method not in ODE_METHODS:
            raise unknown_name("--ode-method", args.ode_method, ODE_METHODS)
    if args.sampler == "ddim" and not 1 <= args.steps <= config.num_train_timesteps:
        raise ConfigError(
            f"--steps: expected 1..{config.num_train_timesteps} (the model's training timesteps), got {args.steps}"
        )
    if len(config.sample_shape) == 1 and config.sample_shape[0] < 2:
        raise ConfigError(f"sample: a scatter needs points of 2+ dims, the model has {config.sample_shape}")
    model = DiffusionModel.from_pretrained(args.checkpoint, device=device, allow_large=args.allow_large)
    model.check_steps(args.sampler, args.steps)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    t0 = time.perf_counter()
    if args.sampler in SDE_SAMPLERS:
        res = model.sample_sde(
            args.n,
            args.sampler,
            args.steps,
            generator,
            snr=args.snr,
            n_corrector=args.n_corrector,
            method=args.ode_method,
            rtol=args.rtol,
            atol=args.atol,
            progress=args.progress,
        )
        seconds = time.perf_counter() - t0
        _write_samples(res.x.cpu(), out, f"{args.sampler}, {args.n} samples")
        what = f"ode {args.ode_method}" if args.sampler == "ode" else f"{args.sampler} {args.steps} steps"
        print(f"{what}: {args.n} samples, NFE {res.nfe}, in {seconds:.2f} s; wrote {out}")
        return 0
    x = model.sample(
        args.n,
        sampler=args.sampler,
        steps=args.steps,
        eta=args.eta,
        spacing=args.spacing,
        generator=generator,
        progress=args.progress,
    ).cpu()
    seconds = time.perf_counter() - t0
    _write_samples(x, out, f"{args.sampler}, {args.n} samples")
    steps = config.num_train_timesteps if args.sampler == "ddpm" else args.steps
    print(f"{args.sampler} {steps} steps, eta {args.eta}: {args.n} samples in {seconds:.2f} s; wrote {out}")
    return 0


def _write_samples(x: torch.Tensor, out: Path, title: str) -> None:
    from notelab.eval import save_image_grid, scatter_png

    out.parent.mkdir(parents=True, exist_ok=True)
    if x.ndim == 2:
        # the first two coordinates of points with more than two
        scatter_png(x[:, :2], out, title=title, lim=None)
    else:
        save_image_grid(x, out)


def likelihood(args: argparse.Namespace) -> int:
    import torch

    from notelab.core.integrate import DIVERGENCE_METHODS
    from notelab.core.runtime import get_device
    from notelab.data import load_dataset
    from notelab.diffusion.likelihood import dequantize
    from notelab.diffusion.pipeline import DiffusionModel
    from notelab.eval.likelihood import bits_per_dim

    check_positive(n=args.n, rtol=args.rtol, atol=args.atol)
    if args.n_bins < 0:
        raise ConfigError(f"--n-bins: expected >= 0 (0: the data's own), got {args.n_bins}")
    if args.divergence not in DIVERGENCE_METHODS:
        raise unknown_name("--divergence", args.divergence, DIVERGENCE_METHODS)
    device = get_device(args.device)
    config = DiffusionModel.load_config(args.checkpoint)
    dataset = load_dataset(args.data)
    if tuple(dataset.sample_shape) != tuple(config.sample_shape):
        raise ConfigError(
            f"--data: samples of shape {tuple(dataset.sample_shape)}, the model takes {config.sample_shape}"
        )
    _, test = dataset.split()
    model = DiffusionModel.from_pretrained(args.checkpoint, device=device, allow_large=args.allow_large)
    x = torch.as_tensor(test.x[: args.n], dtype=torch.float32)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    images = x.ndim > 2
    if images:  # bits/dim of the discrete pixels: uniform dequantisation by one bin of the pixel grid
        # digits: 17 levels k / 8 - 1, one bin = 2 / 16; other images: 256 levels over [-1, 1]
        n_bins = args.n_bins or (16 if args.data == "digits" else 256)
        x = dequantize(x, 2.0 / n_bins, torch.Generator().manual_seed(args.seed))
    t0 = time.perf_counter()
    res = model.log_likelihood(x, rtol=args.rtol, atol=args.atol, divergence=args.divergence, generator=generator)
    seconds = time.perf_counter() - t0
    nll = -res.log_p.double()
    se = nll.std().item() / len(nll) ** 0.5 if len(nll) > 1 else float("nan")
    dims = x[0].numel()
    line = f"NLL {nll.mean().item():.4f} +- {se:.4f} nats ({len(nll)} held-out samples of {args.data})"
    if images:
        bpd = bits_per_dim(res.log_p.double(), dims, n_bins=n_bins)
        line += f", {bpd.mean().item():.4f} bits/dim (bin width 2/{n_bins}, dequantised)"
    print(f"{line}; NFE {res.nfe}, {seconds:.2f} s")
    return 0
