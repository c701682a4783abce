"""Claim: a model trained as a DDPM can be sampled by DDIM in 20-100 steps with quality close to
1000-step DDPM, 10-50x faster.

Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", Table 1: one network trained with
DDPM's objective (Ho et al. 2020, eq. 14), sampled with the generalised step (DDIM eq. 12) over a
sub-sequence of S timesteps, with noise sigma_t(eta) of eq. 16 (eta=0: DDIM; eta=1: DDPM-like).
On CIFAR-10 they report FID 13.36 at S=10 and about 4 at S=100 for eta=0, against 3.17 for
DDPM at 1000 steps.

Here, on scikit-learn's 8x8 digits: train a small UNet DDPM (epsilon prediction, linear betas,
T=1000, EMA weights) with ``notelab.train.fit``, then sample it by DDPM-1000 with several seeds
(the seed-to-seed spread of its FD-digits is the yardstick) and by DDIM with S in {10, 20, 50,
100} x eta in {0, 1}. The claim holds when DDIM with eta=0 at some S in 20..100 has FD-digits
within DDPM-1000's mean + 2 std at >= 10x less wall time.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from notelab.core.runtime import get_device, seed_everything
from notelab.data import load_dataset
from notelab.diffusion.pipeline import DiffusionConfig, DiffusionModel, train_diffusion
from notelab.eval import fd_digits, save_image_grid
from notelab.reproduce.base import ClaimResult, Figure, Table
from notelab.train import TrainConfig

NAME = "ddim"
TITLE = "DDIM: a DDPM sampled in 20-100 steps at 10-50x less time"
CLAIM = (
    "A model trained as a DDPM can be sampled by DDIM in 20-100 steps with quality close to "
    "1000-step DDPM, 10-50x faster."
)


@dataclass
class Settings:
    train_steps: int  # optimizer steps of the DDPM
    batch_size: int
    lr: float
    warmup_steps: int
    ema_decay: float
    base_channels: int  # UNet width at 8x8
    num_res_blocks: int
    n_samples: int  # samples per setting, scored by FD-digits
    ddpm_seeds: int  # DDPM-1000 runs with different noise, for the seed-to-seed spread
    ddim_steps: tuple[int, ...] = (10, 20, 50, 100)
    etas: tuple[float, ...] = (0.0, 1.0)
    num_train_timesteps: int = 1000  # T of the DDPM (smaller only in tests)
    spread_k: float = 2.0  # "within DDPM's spread" = FD <= mean + k * std
    min_speedup: float = 10.0
    # x0 clipped to the data range inside every step, for both samplers (as DDPM's reference code and
    # diffusers' DDIMScheduler default do)
    clip_sample: bool = True


QUICK = Settings(
    train_steps=2500,
    batch_size=64,
    lr=2e-3,
    warmup_steps=20,
    ema_decay=0.995,
    base_channels=16,
    num_res_blocks=1,
    n_samples=96,
    ddpm_seeds=3,
)
FULL = Settings(
    train_steps=5000,
    batch_size=128,
    lr=1e-3,
    warmup_steps=200,
    ema_decay=0.999,
    base_channels=32,
    num_res_blocks=1,
    n_samples=400,
    ddpm_seeds=3,
)


def spread_threshold(ddpm_fds: list[float], k: float) -> float:
    """DDPM's mean FD plus ``k`` sample standard deviations over seeds: "close to DDPM" means at most this."""
    return float(np.mean(ddpm_fds)) + k * float(np.std(ddpm_fds, ddof=1))


def judge(
    ddim: dict[tuple[float, int], dict[str, float]], ddpm_fds: list[float], ddpm_secs: list[float], s: Settings
) -> tuple[str, list[int]]:
    """The verdict and the DDIM step counts S in 20..100 (eta=0) that are close to DDPM and fast enough.

    ``ddim[(eta, S)]`` holds ``fd`` and ``seconds``; this adds ``speedup`` (DDPM's mean time over
    the setting's) and ``within`` (FD at most :func:`spread_threshold`) to each entry.
    """
    threshold = spread_threshold(ddpm_fds, s.spread_k)
    ddpm_sec = float(np.mean(ddpm_secs))
    for r in ddim.values():
        r["speedup"] = ddpm_sec / r["seconds"]
        r["within"] = bool(r["fd"] <= threshold)
    passing = [
        S
        for (eta, S), r in sorted(ddim.items(), key=lambda kv: kv[0][1])
        if eta == 0.0 and 20 <= S <= 100 and r["within"] and r["speedup"] >= s.min_speedup
    ]
    if not all(np.isfinite(ddpm_fds)):
        return "inconclusive", passing
    return ("holds" if passing else "does not hold"), passing


def _timed_sample(model: DiffusionModel, n: int, seed: int, **kw: object) -> tuple[torch.Tensor, float]:
    device = model.device
    generator = torch.Generator(device=device).manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    x = model.sample(n, generator=generator, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    # Scored as images are: clipped to the data range [-1, 1] (as FID clips to 0..255).
    return x.float().cpu().nan_to_num(0.0).clamp(-1, 1), seconds


def _fmt(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}"


def _quality_vs_time(path: Path, ddim: dict, ddpm_fds: list[float], ddpm_secs: list[float], s: Settings) -> None:
    # matplotlib's object API: no pyplot, so no global backend or figure state is touched
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for eta, marker in zip(s.etas, "os^"):
        pts = [(ddim[(eta, S)]["seconds"], ddim[(eta, S)]["fd"], S) for S in s.ddim_steps]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=f"DDIM eta={eta:g}")
        for sec, fd, S in pts:
            ax.annotate(f"S={S}", (sec, fd), textcoords="offset points", xytext=(4, 4), fontsize=8)
    mean, std = float(np.mean(ddpm_fds)), float(np.std(ddpm_fds, ddof=1))
    ax.errorbar([float(np.mean(ddpm_secs))], [mean], yerr=[s.spread_k * std], fmt="k*", ms=10, capsize=4)
    ax.annotate("DDPM T=1000", (float(np.mean(ddpm_secs)), mean), textcoords="offset points", xytext=(-70, 8))
    ax.axhline(mean + s.spread_k * std, color="gray", ls="--", lw=1, label=f"DDPM mean + {s.spread_k:g} std")
    ax.set_xscale("log")
    ax.set_xlabel(f"wall time for {s.n_samples} samples (s, log scale)")
    ax.set_ylabel("FD-digits (lower is better)")
    ax.set_title("Sample quality vs sampling time, one DDPM-trained UNet")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(out_dir: Path, quick: bool = False, seed: int = 0) -> ClaimResult:
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    s = QUICK if quick else FULL
    seed_everything(seed)
    device = get_device("auto")

    dataset = load_dataset("digits")
    config = DiffusionConfig.for_shape(
        dataset.sample_shape,
        net_config={"base_channels": s.base_channels, "channel_mults": (1, 2), "num_res_blocks": s.num_res_blocks},
        num_train_timesteps=s.num_train_timesteps,
    )
    train_config = TrainConfig(
        steps=s.train_steps,
        batch_size=s.batch_size,
        lr=s.lr,
        warmup_steps=s.warmup_steps,
        min_lr_ratio=0.1,
        ema_decay=s.ema_decay,
        device=str(device),
        seed=seed,
        log_every=max(1, s.train_steps // 50),
        progress=False,
    )
    t0 = time.perf_counter()
    model = train_diffusion(dataset, out_dir / "model", train_config, config).to(device)
    train_seconds = time.perf_counter() - t0
    T = config.num_train_timesteps

    # DDPM-1000 with several noise seeds: its FD spread is what "close to DDPM" is measured against.
    ddpm_fds, ddpm_secs = [], []
    for k in range(s.ddpm_seeds):
        x, sec = _timed_sample(model, s.n_samples, seed * 1000 + k, sampler="ddpm", clip_sample=s.clip_sample)
        ddpm_fds.append(float(fd_digits(x)))
        ddpm_secs.append(sec)
        if k == 0:
            save_image_grid(x[:64], out_dir / f"samples_ddpm_{T}.png")

    # DDIM from the same initial noise as DDPM's first seed.
    ddim: dict[tuple[float, int], dict[str, float]] = {}
    for eta in s.etas:
        for S in s.ddim_steps:
            x, sec = _timed_sample(
                model, s.n_samples, seed * 1000, sampler="ddim", steps=S, eta=eta, clip_sample=s.clip_sample
            )
            ddim[(eta, S)] = {"fd": float(fd_digits(x)), "seconds": sec}
            save_image_grid(x[:64], out_dir / f"samples_ddim_eta{eta:g}_S{S}.png")

    # The floor: real digits scored the same way, at the same sample count.
    pick = torch.randperm(len(dataset.x), generator=torch.Generator().manual_seed(seed))[: s.n_samples]
    data_fd = float(fd_digits(dataset.x[pick]))

    verdict, passing = judge(ddim, ddpm_fds, ddpm_secs, s)
    ddpm_mean, ddpm_std = float(np.mean(ddpm_fds)), float(np.std(ddpm_fds, ddof=1))
    threshold = spread_threshold(ddpm_fds, s.spread_k)
    ddpm_sec = float(np.mean(ddpm_secs))

    # Tables laid out like DDIM's Table 1: rows eta, columns S, plus DDPM at T=1000.
    cols = ["", *[f"S = {S}" for S in s.ddim_steps], f"T = {T}"]
    fd_rows = [[f"DDIM eta = {eta:g}", *[_fmt(ddim[(eta, S)]["fd"]) for S in s.ddim_steps], "-"] for eta in s.etas]
    fd_rows.append(
        [f"DDPM ({s.ddpm_seeds} seeds)", *["-"] * len(s.ddim_steps), f"{_fmt(ddpm_mean)} +- {_fmt(ddpm_std)}"]
    )
    time_rows = [
        [
            f"DDIM eta = {eta:g}",
            *[f"{_fmt(ddim[(eta, S)]['seconds'])} ({ddim[(eta, S)]['speedup']:.0f}x)" for S in s.ddim_steps],
            "-",
        ]
        for eta in s.etas
    ]
    time_rows.append(["DDPM", *["-"] * len(s.ddim_steps), f"{_fmt(ddpm_sec)} (1x)"])
    seed_rows = [[seed * 1000 + k, _fmt(fd), _fmt(sec)] for k, (fd, sec) in enumerate(zip(ddpm_fds, ddpm_secs))]
    tables = [
        Table(
            title="FD-digits (lower is better)",
            columns=cols,
            rows=fd_rows,
            note=f"{s.n_samples} samples per cell; DDPM as mean +- std over seeds; "
            f"'within spread' threshold = mean + {s.spread_k:g} std = {_fmt(threshold)}; "
            f"{s.n_samples} real digits score {_fmt(data_fd)} (the floor at this sample count).",
        ),
        Table(
            title=f"Wall time for {s.n_samples} samples, seconds (speed-up over DDPM-{T})",
            columns=cols,
            rows=time_rows,
            note=f"device {device}, torch threads {torch.get_num_threads()}.",
        ),
        Table(title=f"DDPM-{T}: seed-to-seed spread", columns=["noise seed", "FD-digits", "seconds"], rows=seed_rows),
    ]

    _quality_vs_time(out_dir / "quality_vs_time.png", ddim, ddpm_fds, ddpm_secs, s)
    figures = [
        Figure("Quality vs sampling time", "quality_vs_time.png", "FD-digits against wall time, log scale."),
        Figure(f"DDPM, {T} steps", f"samples_ddpm_{T}.png", "Ancestral sampling (Ho et al. 2020, Alg. 2)."),
        *[
            Figure(f"DDIM eta={eta:g}, S={S}", f"samples_ddim_eta{eta:g}_S{S}.png", "Same initial noise as DDPM.")
            for eta in s.etas
            for S in (min(s.ddim_steps), 50)
            if S in s.ddim_steps
        ],
    ]
    if (out_dir / "model" / "loss.png").is_file():
        figures.append(Figure("Training loss", "model/loss.png", "DDPM simple loss (eq. 14) per logged step."))

    in_range = [S for S in s.ddim_steps if 20 <= S <= 100] or list(s.ddim_steps)
    best = min(in_range, key=lambda S: ddim[(0.0, S)]["fd"])
    b = ddim[(0.0, best)]
    summary = (
        f"DDPM-{T}: FD-digits {_fmt(ddpm_mean)} +- {_fmt(ddpm_std)} over {s.ddpm_seeds} seeds in {_fmt(ddpm_sec)} s. "
        f"Best DDIM (eta=0) in 20..100 steps: S={best}, FD {_fmt(b['fd'])} in {_fmt(b['seconds'])} s "
        f"({b['speedup']:.0f}x faster). "
        + (
            f"DDIM eta=0 is within DDPM's spread at >= {s.min_speedup:g}x speed-up for S in {passing}."
            if passing
            else f"No DDIM eta=0 setting with S in 20..100 is within DDPM's spread at >= {s.min_speedup:g}x speed-up."
        )
        + (" Quick run: a small model trained briefly; the full run is the one to quote." if quick else "")
    )
    settings = {
        "quick": quick,
        "seed": seed,
        "device": str(device),
        "train": {k: v for k, v in dataclasses.asdict(train_config).items() if k not in ("out_dir", "progress")},
        "diffusion": dataclasses.asdict(config),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(train_seconds, 1),
        "n_samples": s.n_samples,
        "ddpm_seeds": s.ddpm_seeds,
        "ddpm_fds": [round(f, 4) for f in ddpm_fds],
        "ddim": {
            f"eta={eta:g},S={S}": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
            for (eta, S), r in ddim.items()
        },
        "threshold": round(threshold, 4),
        "data_fd": round(data_fd, 4),
    }
    return ClaimResult(
        name=NAME,
        title=TITLE,
        claim=CLAIM,
        verdict=verdict,
        summary=summary,
        tables=tables,
        figures=figures,
        settings=settings,
        seconds=time.perf_counter() - t_start,
    )
