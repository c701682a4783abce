"""Claim: a model trained as a DDPM can be sampled by DDIM in 20-100 steps with quality close to
1000-step DDPM, 10-50x faster.

Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", Table 1: one network trained with
DDPM's objective (Ho et al. 2020, eq. 14), sampled with the generalised step (DDIM eq. 12) over a
sub-sequence of S timesteps, with noise sigma_t(eta) of eq. 16 (eta=0: DDIM; eta=1: DDPM-like).
On CIFAR-10 they report FID 13.36 / 6.84 / 4.67 / 4.16 at S = 10 / 20 / 50 / 100 for eta=0,
against 3.17 for DDPM at 1000 steps (the sigma-hat row).

Here, on scikit-learn's 8x8 digits: train a small UNet DDPM (epsilon prediction, linear betas,
T=1000, EMA weights) with ``notelab.train.fit``, then, for each of several noise seeds, sample it
by DDPM-1000 and by DDIM with S in {10, 20, 50, 100} x eta in {0, 1} from the same initial noise,
and score every sample set by FD-digits (FID's formula in a digits classifier's features).

Decision rule (per S in 20..100, eta=0; the claim holds when some S passes both):

- quality: the paired relative gap FD(DDIM, seed k) / FD(DDPM, seed k) - 1, over the noise seeds,
  has a 95% t-interval entirely below the paper's own gap at that S (6.84 / 3.17 - 1 = +116% at
  S=20, +47% at S=50, +31% at S=100): "as close to DDPM as in the paper";
- speed: the paired wall-time ratio DDPM / DDIM (each pair timed back to back, so a load burst
  hits both) has its interval above 10x.

"Does not hold" when every S fails one of them with the interval on the wrong side; otherwise
inconclusive. FD-digits of a real subset of the same size is shown as a reference: it is not a
floor (small-sample FD is biased upwards, and a sampler can land below it).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from notelab.core.runtime import get_device
from notelab.data import load_dataset
from notelab.diffusion.pipeline import DiffusionConfig, DiffusionModel, train_diffusion
from notelab.eval import fd_digits, save_image_grid
from notelab.reproduce import rules
from notelab.reproduce.base import (
    ClaimResult,
    Figure,
    PaperNumber,
    Progress,
    Section,
    Table,
    begin,
    mean_std,
    one_thread,
)
from notelab.train import TrainConfig

NAME = "ddim"
TITLE = "DDIM: a DDPM sampled in 20-100 steps at 10-50x less time"
CLAIM = (
    "A model trained as a DDPM can be sampled by DDIM in 20-100 steps with quality close to "
    "1000-step DDPM, 10-50x faster."
)
SOURCE = "Song et al. 2021 (DDIM), Table 1, CIFAR-10"
# CIFAR-10 FID, Song et al. 2021 Table 1: (eta, S) -> FID; DDPM at T=1000 is the sigma-hat row.
PAPER_FID = {
    (0.0, 10): 13.36,
    (0.0, 20): 6.84,
    (0.0, 50): 4.67,
    (0.0, 100): 4.16,
    (1.0, 10): 41.07,
    (1.0, 20): 18.36,
    (1.0, 50): 8.01,
    (1.0, 100): 5.78,
}
PAPER_DDPM_FID = 3.17
QUALITY_GROUP = "DDIM (eta=0) as close to DDPM-1000 as in the paper, at >= 10x less time, for some S in 20..100"


@dataclass
class Settings:
    train_steps: int  # optimizer steps of the DDPM
    batch_size: int
    lr: float
    warmup_steps: int
    ema_decay: float
    base_channels: int  # UNet width at 8x8
    num_res_blocks: int
    n_samples: int  # samples per setting and seed, scored by FD-digits
    ddpm_seeds: int  # noise seeds: DDPM-1000 and every DDIM setting sampled from each seed's noise
    ddim_steps: tuple[int, ...] = (10, 20, 50, 100)
    etas: tuple[float, ...] = (0.0, 1.0)
    num_train_timesteps: int = 1000  # T of the DDPM (smaller only in tests)
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
    ddpm_seeds=4,
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
    ddpm_seeds=5,
)


def paper_gap(S: int) -> float | None:
    """The paper's relative FID gap of DDIM (eta=0) at S steps over DDPM at 1000: FID_S / 3.17 - 1."""
    fid = PAPER_FID.get((0.0, S))
    return None if fid is None else fid / PAPER_DDPM_FID - 1


def decide(fds: dict[str, list[float]], secs: dict[str, list[float]], s: Settings) -> list[rules.Check]:
    """The checks of the rule in the module docstring, from per-seed FD and seconds.

    ``fds["ddpm"]`` / ``fds[f"ddim eta=0 S={S}"]`` hold one value per noise seed, paired by index;
    ``secs`` likewise.
    """
    checks = []
    for S in s.ddim_steps:
        gap, key = paper_gap(S), f"ddim eta=0 S={S}"
        if not 20 <= S <= 100 or gap is None or key not in fds:
            continue
        quality = [a / b - 1 for a, b in zip(fds[key], fds["ddpm"])]
        speed = rules.paired_ratios(secs["ddpm"], secs[key])
        checks += [
            rules.check(
                QUALITY_GROUP,
                f"S={S}: FD gap over DDPM-1000",
                f"paired FD(DDIM)/FD(DDPM) - 1 over noise seeds below the paper's gap at S={S} "
                f"({PAPER_FID[(0.0, S)]} / {PAPER_DDPM_FID} - 1)",
                quality,
                gap,
                below=True,
                option=f"S={S}",
                scale=100,
                unit="%",
            ),
            rules.check(
                QUALITY_GROUP,
                f"S={S}: wall-time speed-up",
                f"paired DDPM / DDIM seconds (timed back to back) above {s.min_speedup:g}x",
                speed,
                s.min_speedup,
                below=False,
                option=f"S={S}",
                unit="x",
            ),
        ]
    return checks


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


def _relative_to_ddpm(fds: dict[str, list[float]], key: str) -> float:
    """Mean FD of ``key`` over mean DDPM FD on the same noise seeds (a setting may have fewer seeds)."""
    n = len(fds[key])
    return statistics.fmean(fds[key]) / statistics.fmean(fds["ddpm"][:n])


def _quality_vs_time(path: Path, fds: dict[str, list[float]], secs: dict[str, list[float]], s: Settings) -> None:
    # matplotlib's object API: no pyplot, so no global backend or figure state is touched
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for eta, marker in zip(s.etas, "os^"):
        keys = [(f"ddim eta={eta:g} S={S}", S) for S in s.ddim_steps]
        x = [statistics.median(secs[k]) for k, _ in keys]
        y = [statistics.fmean(fds[k]) for k, _ in keys]
        ax.plot(x, y, marker=marker, label=f"DDIM eta={eta:g}")
        for sec, fd, (_, S) in zip(x, y, keys):
            ax.annotate(f"S={S}", (sec, fd), textcoords="offset points", xytext=(4, 4), fontsize=8)
    mean = statistics.fmean(fds["ddpm"])
    std = statistics.stdev(fds["ddpm"]) if len(fds["ddpm"]) > 1 else 0.0
    t = statistics.median(secs["ddpm"])
    ax.errorbar([t], [mean], yerr=[std], fmt="k*", ms=10, capsize=4)
    ax.annotate(f"DDPM T={s.num_train_timesteps}", (t, mean), textcoords="offset points", xytext=(-70, 8))
    ax.set_xscale("log")
    ax.set_xlabel(f"median wall time for {s.n_samples} samples (s, log scale)")
    ax.set_ylabel(f"FD-digits, mean over {len(fds['ddpm'])} noise seeds (lower is better)")
    ax.set_title("Sample quality vs sampling time, one DDPM-trained UNet")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def train_section(s: Settings, seed: int, out_dir: Path, progress: Progress) -> tuple[DiffusionModel, Section]:
    """The DDPM: a small UNet trained with the simple loss (eq. 14), EMA weights."""
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
        progress=progress.stream is not None,
    )
    t0 = time.perf_counter()
    model = train_diffusion(dataset, out_dir / "model", train_config, config).to(device)
    figures = []
    if (out_dir / "model" / "loss.png").is_file():
        figures.append(Figure("Training loss", "model/loss.png", "DDPM simple loss (eq. 14) per logged step."))
    values = {
        "device": str(device),
        "train": {k: v for k, v in dataclasses.asdict(train_config).items() if k not in ("out_dir", "progress")},
        "diffusion": dataclasses.asdict(config),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(time.perf_counter() - t0, 1),
        "dataset": dataset,
    }
    return model, Section(figures=figures, values=values)


def sampling_section(model: DiffusionModel, s: Settings, seed: int, out_dir: Path, progress: Progress) -> Section:
    """Per noise seed: DDPM-1000, then every DDIM setting from the same initial noise, timed back to back."""
    T = s.num_train_timesteps
    fds: dict[str, list[float]] = {"ddpm": []}
    secs: dict[str, list[float]] = {"ddpm": []}
    # One untimed call first: on CUDA the network is compiled on its first call (pipeline.sample's
    # compile="auto"), which must not be charged to whichever sampler happens to run first.
    _timed_sample(model, s.n_samples, seed, sampler="ddim", steps=2, clip_sample=s.clip_sample)
    for k in range(s.ddpm_seeds):
        noise_seed = seed * 1000 + k
        # eta = 0 (the claim's sampler) at every seed; other etas at the first seed only (shown, not judged)
        settings = [(eta, S) for eta in s.etas for S in s.ddim_steps if eta == 0.0 or k == 0]
        progress.step(k + 1, s.ddpm_seeds, f"noise seed {noise_seed}: DDPM-{T}, then {len(settings)} DDIM settings")
        x, sec = _timed_sample(model, s.n_samples, noise_seed, sampler="ddpm", clip_sample=s.clip_sample)
        fds["ddpm"].append(float(fd_digits(x)))
        secs["ddpm"].append(sec)
        if k == 0:
            save_image_grid(x[:64], out_dir / f"samples_ddpm_{T}.png")
        for eta, S in settings:
            key = f"ddim eta={eta:g} S={S}"
            x, sec = _timed_sample(
                model, s.n_samples, noise_seed, sampler="ddim", steps=S, eta=eta, clip_sample=s.clip_sample
            )
            fds.setdefault(key, []).append(float(fd_digits(x)))
            secs.setdefault(key, []).append(sec)
            if k == 0:
                save_image_grid(x[:64], out_dir / f"samples_ddim_eta{eta:g}_S{S}.png")
    checks = decide(fds, secs, s)
    _quality_vs_time(out_dir / "quality_vs_time.png", fds, secs, s)

    # Tables laid out like DDIM's Table 1: rows eta, columns S, plus DDPM at T.
    cols = ["", *[f"S = {S}" for S in s.ddim_steps], f"T = {T}"]
    n = s.ddpm_seeds
    fd_rows = [
        [f"DDIM eta = {eta:g}", *[mean_std(fds[f"ddim eta={eta:g} S={S}"]) for S in s.ddim_steps], "-"]
        for eta in s.etas
    ]
    fd_rows.append([f"DDPM ({n} noise seeds)", *["-"] * len(s.ddim_steps), mean_std(fds["ddpm"])])
    ddpm_sec = statistics.median(secs["ddpm"])

    def time_cell(key: str) -> str:
        ratio = statistics.median(rules.paired_ratios(secs["ddpm"][: len(secs[key])], secs[key]))
        return f"{_fmt(statistics.median(secs[key]))} ({ratio:.0f}x)"

    time_rows = [
        [f"DDIM eta = {eta:g}", *[time_cell(f"ddim eta={eta:g} S={S}") for S in s.ddim_steps], "-"] for eta in s.etas
    ]
    time_rows.append(["DDPM", *["-"] * len(s.ddim_steps), f"{_fmt(ddpm_sec)} (1x)"])
    seed_cols = ["noise seed", f"DDPM-{T} FD", *[f"DDIM eta=0 S={S} FD" for S in s.ddim_steps], "DDPM seconds"]
    seed_rows = [
        [seed * 1000 + k, _fmt(fds["ddpm"][k]), *[_fmt(fds[f"ddim eta=0 S={S}"][k]) for S in s.ddim_steps]]
        + [_fmt(secs["ddpm"][k])]
        for k in range(n)
    ]
    tables = [
        Table(
            title="FD-digits (lower is better), mean +- std over noise seeds (eta != 0: first seed only)",
            columns=cols,
            rows=fd_rows,
            note=f"{s.n_samples} samples per cell and seed; every DDIM setting starts from the noise of the "
            "DDPM run of its seed.",
        ),
        Table(
            title=f"Wall time for {s.n_samples} samples, median seconds (median paired speed-up over DDPM-{T})",
            columns=cols,
            rows=time_rows,
            note=f"device {model.device}, torch threads {torch.get_num_threads()}; each DDIM run is timed right "
            "after its seed's DDPM run, and the speed-up is the median of those per-seed ratios.",
        ),
        Table(title="Per noise seed", columns=seed_cols, rows=seed_rows),
    ]
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
    paper = [
        PaperNumber(
            f"FD, DDIM eta={eta:g} at S={S} (relative to DDPM-1000)",
            f"FID {PAPER_FID[(eta, S)]} ({PAPER_FID[(eta, S)] / PAPER_DDPM_FID:.2f}x DDPM's {PAPER_DDPM_FID})",
            SOURCE,
            f"FD-digits {statistics.fmean(fds[f'ddim eta={eta:g} S={S}']):.1f} "
            f"({_relative_to_ddpm(fds, f'ddim eta={eta:g} S={S}'):.2f}x DDPM's on the same seeds; "
            f"8x8 digits, {s.n_samples} samples)",
        )
        for eta in s.etas
        for S in s.ddim_steps
        if (eta, S) in PAPER_FID
    ]
    values = {"fds": fds, "seconds": secs}
    return Section(tables=tables, figures=figures, values=values, checks=checks, paper=paper)


def reference_section(dataset: object, s: Settings, seed: int) -> Section:
    """FD-digits of ``n_samples`` real digits against all of them: what real data scores at this sample count."""
    pick = torch.randperm(len(dataset.x), generator=torch.Generator().manual_seed(seed))[: s.n_samples]
    return Section(values={"data_fd": float(fd_digits(dataset.x[pick]))})


def run(out_dir: Path, quick: bool = False, seed: int = 0, progress: Progress | None = None) -> ClaimResult:
    out_dir, progress, t_start = begin(out_dir, seed, progress)
    s = QUICK if quick else FULL
    with one_thread(quick):
        with progress.part(f"train the DDPM ({s.train_steps} steps)"):
            model, trained = train_section(s, seed, out_dir, progress)
        with progress.part(f"sample: {s.ddpm_seeds} noise seeds x (DDPM-{s.num_train_timesteps} + DDIM)"):
            sampled = sampling_section(model, s, seed, out_dir, progress)
        reference = reference_section(trained.values.pop("dataset"), s, seed)
    data_fd = reference.values["data_fd"]
    fds = sampled.values["fds"]
    checks = sampled.checks
    verdict = rules.claim_verdict(checks)
    T = s.num_train_timesteps
    sampled.tables[0].note += (
        f" Real-vs-real reference: {s.n_samples} real digits score {_fmt(data_fd)} against all 1,797 (FD is "
        "biased upwards at small sample counts, so this is what real data scores at this count; it is not a "
        "floor: a sampler can land below it by chance or by drawing less varied digits)."
    )
    passing = [c.option for c in checks if c.verdict == "holds" and "FD gap" in c.name]
    in_range = [S for S in s.ddim_steps if 20 <= S <= 100] or list(s.ddim_steps)
    best = min(in_range, key=lambda S: statistics.fmean(fds[f"ddim eta=0 S={S}"]))
    summary = (
        f"DDPM-{T}: FD-digits {mean_std(fds['ddpm'])} over {s.ddpm_seeds} noise seeds. Best DDIM (eta=0) in "
        f"20..100 steps: S={best}, FD {mean_std(fds[f'ddim eta=0 S={best}'])}. "
        + (
            f"As close to DDPM as the paper's own gap at: {', '.join(passing)}."
            if passing
            else "At no S in 20..100 is the FD gap's interval below the paper's own gap."
        )
        + f" Verdict by the rule below ({verdict})."
        + (" Quick run: a small model trained briefly; the full run is the one to quote." if quick else "")
    )
    settings = {
        "quick": quick,
        "seed": seed,
        **trained.values,
        "n_samples": s.n_samples,
        "ddpm_seeds": s.ddpm_seeds,
        "fds": {k: [round(v, 4) for v in vs] for k, vs in fds.items()},
        "seconds": {k: [round(v, 4) for v in vs] for k, vs in sampled.values["seconds"].items()},
        "data_fd": round(data_fd, 4),
    }
    return ClaimResult.from_sections(
        NAME, TITLE, CLAIM, (sampled, trained), summary=summary, settings=settings, t_start=t_start,
        progress=progress, verdict=verdict,
    )  # fmt: skip
