"""``notelab vq train | reconstruct | train-prior | sample``: a VQ-VAE, its scores, its Llama prior over codes, samples.

    notelab vq train --data digits --out runs/vq [--codebook ema|loss --codebook-size K --code-dim D
        --downsample F --hidden H --res-blocks R --beta B --decay G --dead-code-threshold T --kmeans-init
        --image-size S --channels C --max-images N]
        [--steps N --batch-size B --lr LR --seed S --device DEV --resume ...]
    notelab vq reconstruct --vqvae runs/vq [--prior runs/vq-prior --n-bins 256 --out reconstructions.png]
    notelab vq train-prior --vqvae runs/vq --out runs/vq-prior [--dim 64 --n-layers 2 --n-heads 4] [training options]
    notelab vq sample --vqvae runs/vq --prior runs/vq-prior --n 64 --out samples.png
        [--temperature 1 --top-k K --top-p P --seed 0 --device DEV]

``train`` and ``train-prior`` use the ``train`` split of the data (``notelab.data``, a fixed 80/20
split), ``reconstruct`` the ``test`` split; the data a VQ-VAE was trained on is recorded in its run's
``data.json`` and found there by the other verbs. Every check runs before anything is written.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

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
from notelab.core.errors import ConfigError

DATA_INFO = "data.json"  # {"data", "image_size", "channels", "max_images"}: what the VQ-VAE was trained on
CODEBOOKS = ("ema", "loss")
VQ_DEFAULTS = {"steps": 2000, "batch_size": 64, "lr": 2e-3}
PRIOR_DEFAULTS = {"steps": 2000, "batch_size": 64, "lr": 3e-3}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("vq", help="VQ-VAE: discrete image codes and a Llama prior over them")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    t = verbs.add_parser("train", help="train a VQ-VAE; writes config.json + model.safetensors + data.json")
    t.add_argument("--data", required=True, help="digits, an image folder, or a .npy/.npz image array")
    t.add_argument("--image-size", type=int, help="resize images to this size")
    t.add_argument("--channels", type=int, help="1 or 3 channels for an image folder")
    t.add_argument("--max-images", type=int, help="read at most this many images of a folder (a seeded subset)")
    t.add_argument("--codebook", default="ema", help="ema (VQ-VAE-2 moving averages) or loss (codebook loss)")
    t.add_argument("--codebook-size", type=int, default=64, help="K codes")
    t.add_argument("--code-dim", type=int, default=16, help="D of a code vector")
    t.add_argument("--downsample", type=int, default=2, help="f: the code grid is (H/f, W/f)")
    t.add_argument("--hidden", type=int, default=64, help="conv width")
    t.add_argument("--res-blocks", type=int, default=2)
    t.add_argument("--beta", type=float, default=0.25, help="commitment weight")
    t.add_argument("--decay", type=float, default=0.99, help="EMA decay")
    t.add_argument("--dead-code-threshold", type=float, default=1.0, help="restart codes below this usage (0: off)")
    t.add_argument("--kmeans-init", action="store_true", help="codebook from k-means on the first batch")
    add_training_options(t, **VQ_DEFAULTS)
    t.set_defaults(func=train)

    e = verbs.add_parser(
        "reconstruct", help="reconstruction MSE, codebook use and (with --prior) bits/dim on the test split"
    )
    e.add_argument("--vqvae", required=True, help="run folder of `notelab vq train`")
    e.add_argument("--prior", help="run folder of `notelab vq train-prior`: adds the prior's bits/dim")
    e.add_argument(
        "--n-bins",
        type=int,
        default=256,
        help="bits/dim: the data's levels are 2/N apart in [-1, 1] (8-bit: 256; digits: 16)",
    )
    e.add_argument("--out", help="PNG of test images above their reconstructions")
    e.add_argument("--device", default="auto")
    add_model_options(e)
    e.set_defaults(func=reconstruct)

    pr = verbs.add_parser("train-prior", help="train a Llama prior over a VQ-VAE's codes (train split)")
    pr.add_argument("--vqvae", required=True, help="run folder of `notelab vq train`")
    pr.add_argument("--dim", type=int, default=64, help="prior width")
    pr.add_argument("--n-layers", type=int, default=2)
    pr.add_argument("--n-heads", type=int, default=4)
    pr.add_argument(
        "--eval-every", type=int, default=100, help="NLL on a held-out tenth of the codes every N steps; best kept"
    )
    add_training_options(pr, **PRIOR_DEFAULTS)
    pr.set_defaults(func=train_prior)

    s = verbs.add_parser("sample", help="draw codes from the prior and decode them; writes a PNG grid")
    s.add_argument("--vqvae", required=True, help="run folder of `notelab vq train`")
    s.add_argument("--prior", required=True, help="run folder of `notelab vq train-prior`")
    s.add_argument("--n", type=int, default=64, help="number of samples")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float)
    s.add_argument("--out", required=True, help="output PNG")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto")
    add_model_options(s)
    s.set_defaults(func=sample)


# ---------------------------------------------------------------------------------------- helpers


def _data_info(vqvae_dir: str | Path) -> dict[str, Any]:
    from notelab.core.config import load_json

    info = load_json(Path(vqvae_dir) / DATA_INFO)
    if not isinstance(info.get("data"), str):
        raise ConfigError(f"{Path(vqvae_dir) / DATA_INFO}: expected a 'data' string, got {info.get('data')!r}")
    return info


def _load_split(info: dict[str, Any], split: str) -> Any:
    from notelab.data import load_dataset

    given = {k: info[k] for k in ("image_size", "channels", "max_images") if info.get(k) is not None}
    ds = load_dataset(info["data"], split=split, **given)
    if ds.kind != "images":
        raise ConfigError(f"--data: expected images (N, C, H, W), got {ds.kind} of shape {tuple(ds.x.shape)}")
    return ds


def _load_vqvae(path: str | Path, device: Any, allow_large: bool) -> Any:
    from notelab.vq import VQVAE

    return VQVAE.from_pretrained(path, device=device, allow_large=allow_large).eval()


def _load_prior(path: str | Path, vqvae: Any, device: Any, allow_large: bool) -> Any:
    from notelab.lm import Llama
    from notelab.vq.prior import check_prior

    model = Llama.from_pretrained(path, device=device, allow_large=allow_large).eval()
    check_prior(model, vqvae)
    return model


# ------------------------------------------------------------------------------------------ verbs


def train(args: argparse.Namespace) -> int:
    from notelab.core.checkpoint import CONFIG_NAME
    from notelab.core.config import config_to_dict, load_json, save_config
    from notelab.core.io import atomic_write_text
    from notelab.train import TrainConfig
    from notelab.vq import VQVAE, config_for, train_vqvae

    check_training_options(args)
    if args.codebook not in CODEBOOKS:
        raise ConfigError(f"--codebook: expected one of {', '.join(CODEBOOKS)}, got {args.codebook!r}")
    folder = prepare_out(args.out, "vq train", resume=args.resume, overwrite=args.overwrite)
    train_config = TrainConfig(**train_config_kwargs(args))
    if folder.resume:
        done = already_complete(folder.path, train_config.steps)
        if done is not None:
            print(complete_message("vq train", done, train_config.steps))
            return 0
    check_positive(max_images=args.max_images)
    info = {"data": str(args.data), "image_size": args.image_size, "channels": args.channels}
    info["max_images"] = args.max_images
    dataset = _load_split(info, "train")
    config = config_for(
        dataset.sample_shape,
        hidden=args.hidden,
        res_blocks=args.res_blocks,
        downsample=args.downsample,
        code_dim=args.code_dim,
        codebook_size=args.codebook_size,
        beta=args.beta,
        ema=args.codebook == "ema",
        decay=args.decay,
        dead_code_threshold=args.dead_code_threshold,
        kmeans_init=args.kmeans_init,
    )
    config_path = folder.path / CONFIG_NAME
    if folder.resume and config_path.is_file():
        check_same_settings(config_path, load_json(config_path), config_to_dict(config))
    seed_all(train_config.seed)
    t0 = time.perf_counter()
    with folder:
        save_config(config, config_path, model_type=VQVAE.model_type)
        atomic_write_text(folder.path / DATA_INFO, json.dumps(info) + "\n")
        train_vqvae(dataset.x, folder.path, train_config, config)
    grid = config.grid
    print(
        f"trained a VQ-VAE on {args.data} ({len(dataset)} images, "
        f"codes {grid[0]}x{grid[1]} of K={config.codebook_size}) "
        f"in {time.perf_counter() - t0:.1f} s; wrote {args.out}"
    )
    return 0


def train_prior(args: argparse.Namespace) -> int:
    import torch

    from notelab.core.runtime import get_device
    from notelab.train import TrainConfig
    from notelab.vq import prior as vq_prior

    check_training_options(args)
    check_positive(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, eval_every=args.eval_every)
    folder = prepare_out(args.out, "vq train-prior", resume=args.resume, overwrite=args.overwrite)
    train_config = TrainConfig(**train_config_kwargs(args))
    if folder.resume:
        done = already_complete(folder.path, train_config.steps)
        if done is not None:
            print(complete_message("vq train-prior", done, train_config.steps))
            return 0
    device = get_device(args.device)
    vqvae = _load_vqvae(args.vqvae, device, args.allow_large)
    c = vqvae.config
    config = vq_prior.prior_config(c.codebook_size, c.grid, dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads)
    config.check_size(args.allow_large)
    dataset = _load_split(_data_info(args.vqvae), "train")
    codes = vq_prior.encode_dataset(vqvae, dataset.x).cpu()
    # a fixed tenth held out: the weights kept are those of the best held-out NLL (early stopping)
    perm = torch.randperm(len(codes), generator=torch.Generator().manual_seed(0))
    val, codes = codes[perm[: max(1, len(codes) // 10)]], codes[perm[max(1, len(codes) // 10) :]]
    seed_all(train_config.seed)
    t0 = time.perf_counter()
    with folder:
        result = vq_prior.train_prior(
            codes, c.codebook_size, train_config, config, val_codes=val.to(device), eval_every=args.eval_every
        )
        vq_prior.save_prior(result, folder.path)
    best = min(r["val_nll"] for r in result.history if "val_nll" in r) / (c.grid[0] * c.grid[1] * math.log(2))
    print(
        f"trained a prior over {len(codes)} code grids ({c.grid[0]}x{c.grid[1]}, K={c.codebook_size}) "
        f"in {time.perf_counter() - t0:.1f} s; held-out {best:.3f} bits per code (uniform "
        f"{math.log2(c.codebook_size):.3f}); wrote {args.out}"
    )
    return 0


def sample(args: argparse.Namespace) -> int:
    from notelab.core.runtime import get_device
    from notelab.eval import save_image_grid
    from notelab.vq.prior import sample_codes

    out = check_out_file(args.out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out: expected a .png path, got {args.out!r}")
    check_positive(n=args.n, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    device = get_device(args.device)
    vqvae = _load_vqvae(args.vqvae, device, args.allow_large)
    model = _load_prior(args.prior, vqvae, device, args.allow_large)
    c = vqvae.config
    t0 = time.perf_counter()
    codes = sample_codes(
        model, args.n, c.grid, c.codebook_size, args.temperature, args.top_k, args.top_p, seed=args.seed
    )
    images = vqvae.decode(codes.to(device)).clamp(-1, 1).cpu()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image_grid(images, out)
    print(f"sampled {args.n} code grids and decoded them in {time.perf_counter() - t0:.2f} s; wrote {out}")
    return 0


def reconstruct(args: argparse.Namespace) -> int:
    import torch

    from notelab.core.runtime import get_device
    from notelab.eval import save_image_grid
    from notelab.vq import evaluate as vq_evaluate
    from notelab.vq.prior import bits_per_dim_bound, code_nll, encode_dataset, prior_bits_per_dim

    out = check_out_file(args.out) if args.out is not None else None
    if out is not None and out.suffix.lower() != ".png":
        raise ConfigError(f"--out: expected a .png path, got {args.out!r}")
    check_positive(n_bins=args.n_bins)
    device = get_device(args.device)
    vqvae = _load_vqvae(args.vqvae, device, args.allow_large)
    model = _load_prior(args.prior, vqvae, device, args.allow_large) if args.prior else None
    info = _data_info(args.vqvae)
    train_x, test_x = _load_split(info, "train").x, _load_split(info, "test").x
    scores = vq_evaluate(vqvae, test_x)
    print(
        f"test reconstruction MSE {scores['mse']:.4f} (data variance {float(test_x.var()):.4f}); "
        f"codebook perplexity {scores['perplexity']:.1f} of K={vqvae.config.codebook_size}, "
        f"{scores['dead_codes']:.0f} codes unused"
    )
    if model is not None:
        variance = vq_evaluate(vqvae, train_x)["mse"]  # the Gaussian decoder's variance: its training MSE
        codes = encode_dataset(vqvae, test_x)
        nll = code_nll(model, codes, vqvae.config.codebook_size)
        with torch.no_grad():
            x_hat = torch.cat([vqvae.decode(codes[i : i + 256].to(device)).cpu() for i in range(0, len(codes), 256)])
        dims = test_x[0].numel()
        print(
            f"prior: {float(nll.mean()) / (codes[0].numel() * 0.6931471805599453):.3f} bits/code "
            f"(uniform: {torch.log2(torch.tensor(float(vqvae.config.codebook_size))):.3f}); "
            f"{prior_bits_per_dim(nll, dims):.3f} bits/dim of the prior; "
            f"bound -log p(x|z)p(z): {bits_per_dim_bound(test_x, x_hat, nll, variance, args.n_bins):.3f} bits/dim "
            f"({args.n_bins} levels)"
        )
    if out is not None:
        x = test_x[torch.linspace(0, len(test_x) - 1, min(16, len(test_x))).long()]  # spread: folders come sorted
        with torch.no_grad():
            recon = vqvae.decode(vqvae.encode(x.to(device))).clamp(-1, 1).cpu()
        out.parent.mkdir(parents=True, exist_ok=True)
        save_image_grid(torch.cat([x, recon]), out, nrow=16)
        print(f"wrote {out}")
    return 0
