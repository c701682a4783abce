"""Claim: a VQ-VAE's discrete code reconstructs images, its codebook stays in use only with
dead-code restart, and an autoregressive prior over the codes models (and generates) them.

van den Oord, Vinyals & Kavukcuoglu 2017, "Neural Discrete Representation Learning": an
encoder's outputs are replaced by their nearest codebook vectors (eq. 1), gradients pass
straight through (sec. 3.2), the codebook follows a codebook loss or moving averages (eq. 3,
appendix A.1), and a PixelCNN prior over the code grid generates images; CIFAR-10 reaches 4.67
bits/dim (sec. 4.1). Dead-code restart (Dhariwal et al. 2020, Jukebox: "random restarts") is the usual
cure for codes that stop being chosen.

Here, on scikit-learn's 8x8 digits (train / test: the fixed 80/20 split), for each of several
seeds: four VQ-VAEs (codebook loss or EMA, each with and without dead-code restart), trained with
``notelab.train.fit``; then a ``notelab.lm`` Llama prior over the codes of the EMA + restart
model, scored on the held-out digits' codes and sampled.

Decision rule (every group must hold; 95% t-intervals over the seeds, ``notelab.reproduce.rules``):

- reconstruction: test MSE / test pixel variance of the EMA + restart model below 0.5 (the
  16 integers of the code explain more than half of the pixel variance; the mean image scores 1.0);
- restart: codes never chosen on the test digits, without restart minus with, paired by seed,
  above 0 for some codebook kind (loss or EMA: the group holds when one of them does);
- prior: the prior's held-out bits per code below ``log2 K`` (a uniform prior's) minus 0.5 bits.

Reported, not judged: codebook perplexity, the prior's bits/dim over the image's pixels, and the
paper's bound ``-log p(x|z) p(z)`` in bits/dim with a Gaussian decoder (17 levels for digits;
the paper's CIFAR-10 figure is on 256 levels, 32x32x3 images and a far larger model).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from notelab.core.runtime import get_device
from notelab.data import load_dataset
from notelab.eval import line_png, save_image_grid
from notelab.reproduce import rules
from notelab.reproduce.base import (
    ClaimResult,
    Figure,
    PaperNumber,
    Progress,
    Section,
    Table,
    begin,
    derived_seeds,
    mean_std,
    one_thread,
)
from notelab.train import TrainConfig
from notelab.vq import (
    VQVAEConfig,
    bits_per_dim_bound,
    code_nll,
    encode_dataset,
    evaluate,
    fit_vqvae,
    prior_bits_per_dim,
    prior_config,
    sample_codes,
    train_prior,
)

NAME = "vqvae"
TITLE = "VQ-VAE: discrete codes, codebook restart, and a prior over codes"
CLAIM = (
    "A VQ-VAE's discrete code (straight-through estimator, codebook loss or EMA) reconstructs images; "
    "without dead-code restart part of the codebook goes unused (under the codebook loss or the EMA); "
    "an autoregressive prior over the codes models them far better than a uniform one and generates images."
)
SOURCE = "van den Oord et al. 2017 (VQ-VAE), sec. 4.1, CIFAR-10"
SETTINGS = (("loss", False), ("loss", True), ("ema", False), ("ema", True))
RECON_LIMIT = 0.5  # the code explains more than half of the pixel variance
PRIOR_MARGIN_BITS = 0.5
DIGIT_LEVELS = 17  # sklearn digits: pixel counts 0..16
# in [-1, 1] those 17 levels lie 2/16 apart: the bin width 2 / n_bins of notelab.eval.bits_per_dim with n_bins 16
DIGIT_BINS = 16


@dataclass
class Settings:
    steps: int  # VQ-VAE optimizer steps
    batch_size: int
    lr: float
    hidden: int
    code_dim: int
    codebook_size: int
    prior_steps: int
    prior_dim: int
    seeds: int  # training seeds per setting
    n_samples: int = 32
    dead_code_threshold: float = 1.0


QUICK = Settings(
    steps=100, batch_size=32, lr=5e-3, hidden=16, code_dim=8, codebook_size=32, prior_steps=80, prior_dim=32, seeds=3
)
FULL = Settings(
    steps=1500,
    batch_size=64,
    lr=2e-3,
    hidden=64,
    code_dim=16,
    codebook_size=64,
    prior_steps=1500,
    prior_dim=64,
    seeds=3,
)


def label(codebook: str, restart: bool) -> str:
    return f"{codebook}{' + restart' if restart else ''}"


def decide(
    relative_mse: list[float], dead_gaps: dict[str, list[float]], prior_bits: list[float], K: int
) -> list[rules.Check]:
    """The module docstring's three groups, from per-seed values (``dead_gaps``: per codebook kind)."""
    return [
        rules.check(
            "reconstruction",
            "EMA + restart: test MSE / test pixel variance",
            f"95% interval below {RECON_LIMIT}",
            relative_mse,
            RECON_LIMIT,
            below=True,
        ),
        *[
            rules.check(
                "restart keeps the codebook in use (some codebook kind)",
                f"{kind}: unused test codes without restart minus with (per seed)",
                "95% interval above 0",
                gaps,
                0.0,
                below=False,
                option=kind,
            )
            for kind, gaps in dead_gaps.items()
        ],
        rules.check(
            "prior",
            "held-out bits per code of the Llama prior",
            f"95% interval below log2 K - {PRIOR_MARGIN_BITS} = {math.log2(K) - PRIOR_MARGIN_BITS:.2f}",
            prior_bits,
            math.log2(K) - PRIOR_MARGIN_BITS,
            below=True,
        ),
    ]


def _train_config(s: Settings, steps: int, lr: float, seed: int, progress: Progress) -> TrainConfig:
    return TrainConfig(
        steps=steps,
        batch_size=s.batch_size,
        lr=lr,
        warmup_steps=min(20, steps // 10),
        seed=seed,
        device=str(get_device("auto")),
        log_every=max(1, steps // 30),
        progress=False,
    )


def vqvae_section(s: Settings, seeds: list[int], data: dict[str, torch.Tensor], progress: Progress) -> Section:
    """Four VQ-VAEs per seed: test MSE, perplexity, unused codes; batch perplexity over training."""
    test = data["test"]
    var = float(test.var())
    scores: dict[str, list[dict[str, float]]] = {label(*k): [] for k in SETTINGS}
    curves: dict[str, list[tuple[int, float, float]]] = {}
    models: dict[str, Any] = {}
    n = len(SETTINGS) * len(seeds)
    for i, seed in enumerate(seeds):
        for codebook, restart in SETTINGS:
            name = label(codebook, restart)
            progress.step(i * len(SETTINGS) + SETTINGS.index((codebook, restart)) + 1, n, f"{name}, seed {seed}")
            config = VQVAEConfig(
                in_channels=1,
                image_size=8,
                hidden=s.hidden,
                res_blocks=1,
                downsample=2,
                code_dim=s.code_dim,
                codebook_size=s.codebook_size,
                ema=codebook == "ema",
                dead_code_threshold=s.dead_code_threshold if restart else 0.0,
            )
            log: list[tuple[int, float, float]] = []

            def record(step: int, logs: dict[str, Any], log: list = log) -> None:
                log.append((step, float(logs["perplexity"]), s.codebook_size * (1 - float(logs["usage"]))))

            model = fit_vqvae(data["train"], config, _train_config(s, s.steps, s.lr, seed, progress), (record,)).model
            model = model.cpu().eval()
            scores[name].append(evaluate(model, test))
            if seed == seeds[0]:
                curves[name] = log
                models[name] = model
    rel = [r["mse"] / var for r in scores[label("ema", True)]]
    gaps = {
        kind: [
            off["dead_codes"] - on["dead_codes"]
            for off, on in zip(scores[label(kind, False)], scores[label(kind, True)])
        ]
        for kind in ("loss", "ema")
    }
    rows = [
        [
            name,
            mean_std([r["mse"] for r in scores[name]], 4),
            mean_std([r["mse"] / var for r in scores[name]], 3),
            mean_std([r["perplexity"] for r in scores[name]], 1),
            mean_std([r["dead_codes"] for r in scores[name]], 1),
        ]
        for name in scores
    ]
    table = Table(
        title=f"Test digits ({len(test)}), mean +- std over {len(seeds)} seeds",
        columns=["codebook", "MSE", "MSE / pixel variance", "perplexity", f"codes unused (of {s.codebook_size})"],
        rows=rows,
        note=f"pixel variance of the test digits {var:.4f}; {s.steps} steps of batch {s.batch_size}; "
        f"restart threshold {s.dead_code_threshold} vectors per batch (debiased usage EMA).",
    )
    return Section(
        tables=[table],
        values={"scores": scores, "curves": curves, "models": models, "relative_mse": rel, "dead_gaps": gaps},
    )


def prior_section(
    s: Settings, seeds: list[int], data: dict[str, torch.Tensor], model: Any, out_dir: Path, progress: Progress
) -> Section:
    """A Llama prior over the codes of the first seed's EMA + restart model, once per seed."""
    K, grid = s.codebook_size, model.config.grid
    codes, test_codes = encode_dataset(model, data["train"]), encode_dataset(model, data["test"])
    # a tenth of the training digits' codes held out for early stopping (the test codes stay unseen)
    perm = torch.randperm(len(codes), generator=torch.Generator().manual_seed(0))
    val_codes, codes = codes[perm[: len(codes) // 10]], codes[perm[len(codes) // 10 :]]
    variance = evaluate(model, data["train"])["mse"]  # the Gaussian decoder's ML variance
    with torch.no_grad():
        x_hat = model.decode(test_codes)
    bits, prior_bpd, bound = [], [], []
    prior = None
    for i, seed in enumerate(seeds):
        progress.step(i + 1, len(seeds), f"prior seed {seed}")
        config = prior_config(K, grid, dim=s.prior_dim, n_layers=2, n_heads=4)
        tc = _train_config(s, s.prior_steps, 3e-3, seed, progress)
        every = max(10, s.prior_steps // 15)
        trained = train_prior(codes, K, tc, config, val_codes=val_codes, eval_every=every).model.cpu().eval()
        nll = code_nll(trained, test_codes, K)
        bits.append(float(nll.mean()) / (grid[0] * grid[1] * math.log(2)))
        prior_bpd.append(prior_bits_per_dim(nll, data["test"][0].numel()))
        bound.append(bits_per_dim_bound(data["test"], x_hat, nll, variance, n_bins=DIGIT_BINS))
        if prior is None:
            prior = trained
    samples = model.decode(sample_codes(prior, s.n_samples, grid, K, top_k=None, seed=seeds[0])).clamp(-1, 1)
    save_image_grid(samples, out_dir / "samples.png", nrow=8)
    table = Table(
        title=f"Llama prior over the {grid[0]}x{grid[1]} code grid (K = {K}), held-out digits, over {len(seeds)} seeds",
        columns=["quantity", "value", "uniform prior"],
        rows=[
            ["bits per code", mean_std(bits, 3), f"{math.log2(K):.3f}"],
            ["prior bits/dim (over 64 pixels)", mean_std(prior_bpd, 3), f"{grid[0] * grid[1] * math.log2(K) / 64:.3f}"],
            [f"bound -log p(x|z)p(z), bits/dim ({DIGIT_LEVELS} levels, bins 1/8 wide)", mean_std(bound, 3), "-"],
        ],
        note=f"prior: {s.prior_dim}-wide, 2 layers, up to {s.prior_steps} steps, the weights of the best NLL on a "
        f"tenth of the training codes held out (early stopping); Gaussian decoder variance = training "
        f"MSE {variance:.4f}; {DIGIT_LEVELS} levels are log2 17 = {math.log2(DIGIT_LEVELS):.2f} bits/dim uniform.",
    )
    return Section(
        tables=[table],
        figures=[Figure("Samples from the prior", "samples.png", "decode(codes drawn from the Llama prior), T = 1.")],
        values={"bits": bits, "prior_bpd": prior_bpd, "bound": bound},
        paper=[
            PaperNumber(
                "bits/dim, -log p(x|z)p(z) (different data: digits 8x8, 17 levels; tiny model and budget)",
                "4.67 (CIFAR-10, PixelCNN prior)",
                SOURCE,
                f"{statistics.fmean(bound):.2f} (digits, Llama prior)",
            )
        ],
    )


def code_patches(model: Any, x: torch.Tensor) -> torch.Tensor:
    """The mean input patch (C, f, f) under each code, over images ``x``: what a code stands for."""
    f, K = model.config.downsample, model.config.codebook_size
    codes = encode_dataset(model, x).flatten()  # (B h w,) raster order per image
    patches = F.unfold(x, kernel_size=f, stride=f).transpose(1, 2).reshape(-1, x.shape[1] * f * f)
    sums = torch.zeros(K, patches.shape[1]).index_add_(0, codes, patches)
    counts = torch.bincount(codes, minlength=K).clamp_min(1).unsqueeze(1)
    return (sums / counts).reshape(K, x.shape[1], f, f)


def figures_section(vq: Section, data: dict[str, torch.Tensor], out_dir: Path) -> Section:
    models, curves = vq.values["models"], vq.values["curves"]
    x = data["test"][:16]
    rows = [x] + [models[name].decode(models[name].encode(x)).clamp(-1, 1) for name in models]
    save_image_grid(torch.cat(rows), out_dir / "reconstructions.png", nrow=16)
    for key, col, ylabel in (("perplexity", 1, "batch code perplexity"), ("unused", 2, "codes unused in the batch")):
        line_png(
            {name: ([c[0] for c in log], [c[col] for c in log]) for name, log in curves.items()},
            out_dir / f"{key}.png",
            xlabel="step",
            ylabel=ylabel,
            title=f"{ylabel} during training (first seed)",
        )
    best = models[label("ema", True)]
    save_image_grid(code_patches(best, data["train"]), out_dir / "codes.png", nrow=8)
    return Section(
        figures=[
            Figure(
                "Reconstructions",
                "reconstructions.png",
                "Top row: test digits; then " + ", ".join(models) + " (first seed).",
            ),
            Figure("Codebook perplexity during training", "perplexity.png", "Per training batch, first seed."),
            Figure("Unused codes during training", "unused.png", "Codes not chosen in the batch, first seed."),
            Figure(
                "What each code stands for",
                "codes.png",
                "Mean 2x2 input patch under each code of the EMA + restart model (training digits).",
            ),
        ]
    )


def run(out_dir: Path, quick: bool = False, seed: int = 0, progress: Progress | None = None) -> ClaimResult:
    out_dir, progress, t_start = begin(out_dir, seed, progress)
    s = QUICK if quick else FULL
    seeds = derived_seeds(seed, s.seeds)
    data = {split: load_dataset("digits", split=split).x for split in ("train", "test")}
    with one_thread(quick):
        with progress.part(f"train 4 VQ-VAEs x {len(seeds)} seeds ({s.steps} steps)"):
            vq = vqvae_section(s, seeds, data, progress)
        with progress.part(f"train the prior x {len(seeds)} seeds ({s.prior_steps} steps), sample"):
            pr = prior_section(s, seeds, data, vq.values["models"][label("ema", True)], out_dir, progress)
        figs = figures_section(vq, data, out_dir)
    checks = decide(vq.values["relative_mse"], vq.values["dead_gaps"], pr.values["bits"], s.codebook_size)
    verdict = rules.claim_verdict(checks)
    groups = rules.group_verdicts(checks)
    scores = vq.values["scores"]
    summary = (
        f"EMA + restart reconstructs held-out digits at MSE / variance {mean_std(vq.values['relative_mse'], 3)}; "
        "codes unused on the test digits: "
        + ", ".join(f"{n} {mean_std([r['dead_codes'] for r in scores[n]], 1)}" for n in scores)
        + f" (of {s.codebook_size}); the prior spends {mean_std(pr.values['bits'], 2)} bits per code "
        f"(uniform {math.log2(s.codebook_size):.2f}). Groups: "
        + "; ".join(f"{g}: {v}" for g, v in groups.items())
        + f". Verdict ({verdict})."
        + (" Quick run: tiny models trained briefly; the full run is the one to quote." if quick else "")
    )
    settings = {
        "quick": quick,
        "seed": seed,
        "seeds": seeds,
        **{k: v for k, v in dataclasses.asdict(s).items()},
        "scores": {k: [{m: round(v, 5) for m, v in r.items()} for r in rs] for k, rs in scores.items()},
        "prior": {k: [round(v, 4) for v in vs] for k, vs in pr.values.items()},
    }
    return ClaimResult.from_sections(
        NAME, TITLE, CLAIM, (vq, figs, pr, Section(checks=checks)), summary=summary, settings=settings,
        t_start=t_start, progress=progress, verdict=verdict,
    )  # fmt: skip
