"""``notelab diffusion train`` and ``notelab diffusion sample``: parse, call notelab.diffusion, print.

    notelab diffusion train --data digits --out runs/ddpm-digits [--steps N --batch-size B --lr LR
        --ema-decay D --ckpt-every N --resume --device DEV --seed S]
    notelab diffusion sample --checkpoint runs/ddpm-digits --sampler ddim --steps 50 --eta 0 --n 64
        --out grid.png [--spacing leading --seed 0]

Every check runs before anything is written, so bad input leaves no file behind.
"""

from __future__ import annotations

import argparse
import time

from notelab.cli.common import (
    add_model_options,
    add_training_options,
    already_complete,
    check_out_file,
    check_same_settings,
    check_training_options,
    complete_message,
    prepare_out,
    seed_all,
    train_config_kwargs,
)
from notelab.core.errors import ConfigError

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
    p = subparsers.add_parser("diffusion", help="DDPM training and DDPM / DDIM sampling")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    t = verbs.add_parser("train", help="train a DDPM on a data set; writes config.json + model.safetensors")
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
    t.set_defaults(func=train)

    s = verbs.add_parser("sample", help="sample a trained DDPM by DDPM or DDIM; writes an image grid or scatter PNG")
    s.add_argument("--checkpoint", required=True, help="run directory written by `notelab diffusion train`")
    s.add_argument("--sampler", default="ddim", help="ddim or ddpm (ddpm always takes all T steps)")
    s.add_argument("--steps", type=int, default=50, help="DDIM steps S, 1..T")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM noise scale: 0 deterministic, 1 DDPM-like")
    s.add_argument("--spacing", default="leading", help="leading, trailing, linspace, quadratic")
    s.add_argument("--n", type=int, default=64, help="number of samples")
    s.add_argument("--out", required=True, help="output PNG")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto")
    s.add_argument("--progress", action="store_true")
    add_model_options(s)
    s.set_defaults(func=sample)


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
    )
    config_path = folder.path / CONFIG_NAME
    if folder.resume and config_path.is_file():  # the same weights under another schedule would resume silently
        check_same_settings(config_path, load_json(config_path), config_to_dict(diffusion_config))
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
    from notelab.eval import save_image_grid, scatter_png

    out = check_out_file(args.out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out: expected a .png path, got {args.out!r}")
    if args.n < 1:
        raise ConfigError(f"--n: expected at least 1 sample, got {args.n}")
    device = get_device(args.device)
    # Config first: a bad --steps is reported before the (larger) weights are read.
    config = DiffusionModel.load_config(args.checkpoint)
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
    out.parent.mkdir(parents=True, exist_ok=True)
    if x.ndim == 2:
        # the first two coordinates of points with more than two
        scatter_png(x[:, :2], out, title=f"{args.sampler}, {args.n} samples", lim=None)
    else:
        save_image_grid(x, out)
    steps = config.num_train_timesteps if args.sampler == "ddpm" else args.steps
    print(f"{args.sampler} {steps} steps, eta {args.eta}: {args.n} samples in {seconds:.2f} s; wrote {out}")
    return 0
