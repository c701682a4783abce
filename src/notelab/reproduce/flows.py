"""Claim: normalizing flows give exact, normalised likelihoods; affine couplings (RealNVP) model a
density better than NICE's volume-preserving additive ones; a continuous flow trained by flow
matching (a regression, like a diffusion model, never computing a likelihood) models it better
than NICE; and rectified flow's reflow straightens the paths so that one Euler step samples well.

Dinh et al. 2015 (NICE): additive couplings with unit Jacobian, a diagonal scaling layer, exact
log-likelihood (the note's anchor: about 4.4 bits/dim on MNIST). Dinh et al. 2017 (RealNVP):
affine couplings (the note's anchor: 3.49 bits/dim on CIFAR-10). Lipman et al. 2023
(flow matching) and Liu et al. 2023 (rectified flow: reflow makes the flow straight, Fig. 1/4).

Here, on the embedded toy density ``moons`` (exact log-density known) and on the 8x8 digits:

1. NICE, RealNVP and flow matching (Lipman's OT path) [+ FFJORD-style CNF in the full run] with
   the same conditioner / field width and steps, several training seeds: test log-likelihood
   (nats per point; the true density's is shown), and the mass of ``exp(log p)`` on a grid.
2. Rectified flow: 1-RF (linear path), then reflow from it on its own (x_0, ODE(x_0)) pairs
   (2-RF); MMD of one-Euler-step samples to held-out data, and Liu et al.'s straightness.
3. NICE on dequantised digits: test bits/dim, samples, and inpainting of the lower half by
   gradient ascent on log p (NICE sec. 5.2), against filling with the training mean.
4. (full run) flows and diffusion side by side: a DDPM (sampled by DDIM, eta 0), flow matching
   and 2-RF (sampled by Euler) with one MLP and one training budget; MMD^2 of samples to held-out
   data against 1..100 network evaluations, and the NFE dopri5 needs.

Decision rules (notelab.reproduce.rules, 95% t-intervals over the training seeds):

- normalised: every model's grid mass within 1% of 1 (noise-free per seed, judged exactly);
- RealNVP > NICE and flow matching > NICE: paired per-seed differences of test log-likelihood,
  interval above 0;
- reflow straightens: paired per-seed MMD(1-RF, 1 step) - MMD(2-RF, 1 step), interval above 0.

The digits part and part 4 are reported, not decided (quick budgets train NICE far below the
paper's size; part 4 runs one training seed). The quick run does parts 1-3 with small models.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from notelab.data import load_dataset
from notelab.eval import line_png, mmd, save_image_grid
from notelab.flows.continuous import ContinuousFlow, Solver
from notelab.flows.inpaint import inpaint
from notelab.flows.matching import straightness
from notelab.flows.train import FlowSpec, draw, evaluate, log_likelihood, train_flow
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

NAME = "flows"
TITLE = "Normalizing flows: NICE, RealNVP, continuous flows, flow matching and rectified flow"
CLAIM = (
    "Flows give exact, normalised likelihoods; affine couplings (RealNVP) beat NICE's additive ones; flow "
    "matching, trained by regression alone, beats NICE's maximum likelihood; reflow lets one Euler step sample well."
)
NORMALISED = "every model's density integrates to 1 (grid mass within 1%)"
AFFINE = "RealNVP's affine couplings reach a higher test log-likelihood than NICE's additive couplings"
REGRESSION = "flow matching (regression only) reaches a higher test log-likelihood than NICE (maximum likelihood)"
REFLOW = "reflow (2-RF) makes one-step samples closer to the data than 1-RF's (MMD)"


@dataclass
class Settings:
    density: str  # toy density of part 1
    models: tuple[str, ...]  # flows compared in part 1
    seeds: int  # training seeds per model (part 1)
    reflow_seeds: int  # training seeds of part 2 (reflow's effect is large: fewer suffice)
    steps: int  # optimizer steps per model (rf: 1-RF + reflow together)
    cnf_steps: int  # steps of the CNF (each solves an ODE with divergence)
    hidden: int
    depth: int  # hidden layers of the conditioners / the field MLP
    batch_size: int
    lr: float
    n_train: int
    n_test: int
    grid: int  # grid points per axis for the mass
    ll_solver: Solver  # ODE solver of the continuous flows' likelihood
    reflow_pairs: int
    digits_steps: int
    digits_lr: float  # NICE's scaling layer must grow by about 1 per pixel: Adam moves it by about lr a step
    inpaint_steps: int
    side_steps: int  # part 4 (0: skipped): steps of each of DDPM, flow matching and rectified flow
    side_nfe: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100)  # network evaluations per sample
    side_hidden: int = 256  # the one MLP (notelab.core.MLPDenoiser) all three train
    side_depth: int = 4


QUICK = Settings(
    density="moons",
    models=("nice", "realnvp", "fm"),
    seeds=6,
    reflow_seeds=3,
    steps=200,
    cnf_steps=0,
    hidden=32,
    depth=3,
    batch_size=256,
    lr=5e-3,
    n_train=4096,
    n_test=1000,
    grid=121,
    ll_solver=Solver("rk4", steps=8),
    reflow_pairs=1024,
    digits_steps=150,
    digits_lr=1e-2,
    inpaint_steps=60,
    side_steps=0,
)
FULL = Settings(
    density="moons",
    models=("nice", "realnvp", "cnf", "fm", "rf"),
    seeds=5,
    reflow_seeds=5,
    steps=3000,
    cnf_steps=600,
    hidden=128,
    depth=3,
    batch_size=512,
    lr=2e-3,
    n_train=20000,
    n_test=5000,
    grid=241,
    ll_solver=Solver("dopri5", rtol=1e-5, atol=1e-5),
    reflow_pairs=8192,
    digits_steps=3000,
    digits_lr=2e-3,
    inpaint_steps=300,
    side_steps=5000,
)
# The grid spans [-LIM, LIM]^2: the moons lie within about [-3, 3] x [-1.5, 1.5], but a briefly trained
# NICE keeps its logistic prior's heavy tails, which hold a few percent of the mass beyond +-4.
LIM = 8.0


def _train_config(s: Settings, steps: int, seed: int) -> TrainConfig:
    # Eager: these models are small, so torch.compile's start-up would cost more than it saves.
    return TrainConfig(
        steps=steps, batch_size=s.batch_size, lr=s.lr, seed=seed, progress=False, log_every=10**6, compile=False
    )


def _grid(n: int) -> tuple[torch.Tensor, float]:
    g = torch.linspace(-LIM, LIM, n)
    return torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2), (2 * LIM / (n - 1)) ** 2


def density_section(s: Settings, seed: int, out_dir: Path, progress: Progress) -> Section:
    """Part 1: each model, each seed: test log-likelihood and grid mass; densities of the first seed."""
    train_x = load_dataset(s.density, n=s.n_train, seed=seed).x
    test_ds = load_dataset(s.density, n=s.n_test, seed=seed + 1)
    true_ll = float(test_ds.density.log_prob(test_ds.x).mean())
    grid, cell = _grid(s.grid)
    lls: dict[str, list[float]] = {m: [] for m in s.models}
    masses: dict[str, list[float]] = {m: [] for m in s.models}
    secs: dict[str, list[float]] = {m: [] for m in s.models}
    images: dict[str, torch.Tensor] = {"true density": test_ds.density.log_prob(grid).exp()}
    seeds = derived_seeds(seed, s.seeds)
    for i, k in enumerate(seeds):
        for m in s.models:
            progress.step(i * len(s.models) + s.models.index(m) + 1, len(seeds) * len(s.models), f"{m} seed {k}")
            steps = s.cnf_steps if m == "cnf" else s.steps
            spec = FlowSpec(model=m, hidden=s.hidden, depth=s.depth, reflow_pairs=s.reflow_pairs)
            t0 = time.perf_counter()
            model, _ = train_flow(spec, train_x, _train_config(s, steps, k))
            secs[m].append(time.perf_counter() - t0)
            lls[m].append(float(log_likelihood(model, test_ds.x, s.ll_solver).mean()))
            density = log_likelihood(model, grid, s.ll_solver, batch=8192).exp()
            masses[m].append(float(density.sum() * cell))
            # what was measured, as it is measured: a run stopped part-way still shows it in its log
            progress.say(f"    {m} seed {k}: test log-likelihood {lls[m][-1]:.3f}, grid mass {masses[m][-1]:.4f}")
            if i == 0:
                images[m] = density
    _density_figure(images, s.grid, out_dir / "densities.png")
    rows = [
        [m, mean_std(lls[m], 3), mean_std(masses[m], 4), mean_std(secs[m], 1), s.cnf_steps if m == "cnf" else s.steps]
        for m in s.models
    ]
    rows.append(["true density", f"{true_ll:.3f}", "1", "-", "-"])
    table = Table(
        f"Test log-likelihood on {s.density} ({s.n_test} unseen points, nats per point; {s.seeds} training seeds)",
        ["model", "test log-likelihood", "grid mass", "train s", "steps"],
        rows,
        note=f"Grid mass: sum of exp(log p) over a {s.grid}x{s.grid} grid of [-{LIM}, {LIM}]^2. Continuous flows' "
        f"log p by the instantaneous change of variables with exact divergence ({s.ll_solver.method}).",
    )
    checks = [
        rules.check(
            NORMALISED,
            f"{m}: |grid mass - 1|",
            "every seed below 1%",
            [abs(v - 1) for v in masses[m]],
            0.01,
            below=True,
            exact=True,
            option="",
        )
        for m in s.models
    ]
    nice = lls.get("nice")
    if nice and "realnvp" in lls:
        diffs = [a - b for a, b in zip(lls["realnvp"], nice)]
        checks.append(
            rules.check(AFFINE, "test log-likelihood, RealNVP - NICE", "interval above 0", diffs, 0.0, below=False)
        )
    if nice and "fm" in lls:
        diffs = [a - b for a, b in zip(lls["fm"], nice)]
        checks.append(
            rules.check(
                REGRESSION, "test log-likelihood, flow matching - NICE", "interval above 0", diffs, 0.0, below=False
            )
        )
    figure = Figure(
        "Learned 2-D densities",
        "densities.png",
        f"exp(log p) on a grid for the true {s.density} density and each model (training seed {seeds[0]}).",
    )
    return Section(
        tables=[table],
        figures=[figure],
        checks=checks,
        values={"log_likelihood": lls, "grid_mass": masses, "train_seconds": secs, "true_log_likelihood": true_ll},
    )


def _density_figure(images: dict[str, torch.Tensor], n: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(images), figsize=(2.6 * len(images), 2.6))
    for ax, (name, img) in zip(axes, images.items()):
        ax.imshow(img.reshape(n, n).numpy(), origin="lower", extent=(-LIM, LIM, -LIM, LIM), cmap="magma")
        ax.set_xlim(-LIM / 2, LIM / 2)  # the mass is summed over the whole grid; the picture shows the data's part
        ax.set_ylim(-LIM / 2, LIM / 2)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reflow_section(s: Settings, seed: int, progress: Progress) -> Section:
    """Part 2: 1-RF vs 2-RF, MMD of 1-step Euler samples and straightness, per training seed."""
    train_x = load_dataset(s.density, n=s.n_train, seed=seed).x
    test_x = load_dataset(s.density, n=s.n_test, seed=seed + 1).x
    one_step = Solver("euler", steps=1)
    mmd1, mmd2, straight1, straight2 = [], [], [], []
    seeds = derived_seeds(seed, s.reflow_seeds)
    for i, k in enumerate(seeds):
        progress.step(i + 1, len(seeds), f"rectified flow seed {k}")
        spec = FlowSpec(model="rf", hidden=s.hidden, depth=s.depth, reflow_pairs=s.reflow_pairs)
        _, results = train_flow(spec, train_x, _train_config(s, s.steps, k))
        rf1, rf2 = results[0].model.eval(), results[1].model.eval()
        assert isinstance(rf1, ContinuousFlow) and isinstance(rf2, ContinuousFlow)
        # rf2 was trained from rf1's weights in place: rf1 is its copy at the end of stage one
        x0 = torch.randn(s.n_test, 2, generator=torch.Generator().manual_seed(k + 7))
        for model, mmds, straights in ((rf1, mmd1, straight1), (rf2, mmd2, straight2)):
            x1, _ = model.sample(len(x0), one_step, x0=x0)
            mmds.append(mmd(x1, test_x))
            straights.append(straightness(model, x0))
    rows = [
        ["1-RF", mean_std(mmd1, 4), mean_std(straight1, 3)],
        ["2-RF (reflow)", mean_std(mmd2, 4), mean_std(straight2, 3)],
    ]
    table = Table(
        f"Rectified flow on {s.density}: one Euler step ({s.reflow_seeds} training seeds)",
        ["model", "MMD^2 to held-out data, 1 step", "straightness (0 = straight)"],
        rows,
        note=f"Reflow on {s.reflow_pairs} pairs (x0, ODE(x0)) of 1-RF, solved by dopri5; each stage half the steps.",
    )
    diffs = [a - b for a, b in zip(mmd1, mmd2)]
    check = rules.check(
        REFLOW, "MMD^2 (1 step), 1-RF - 2-RF", "interval above 0", diffs, 0.0, below=False, scale=1e3, unit="e-3"
    )
    return Section(
        tables=[table],
        checks=[check],
        values={"mmd_1rf": mmd1, "mmd_2rf": mmd2, "straightness_1rf": straight1, "straightness_2rf": straight2},
    )


def digits_section(s: Settings, seed: int, out_dir: Path, progress: Progress) -> Section:
    """Part 3: NICE on dequantised digits: test bits/dim, samples, inpainting of the lower half."""
    train = load_dataset("digits", split="train").x
    test = load_dataset("digits", split="test").x
    spec = FlowSpec(model="nice", n_bins=17, hidden=max(64, 4 * s.hidden))
    progress.step(1, 2, f"NICE on digits, {s.digits_steps} steps")
    model, _ = train_flow(spec, train, dataclasses.replace(_train_config(s, s.digits_steps, seed), lr=s.digits_lr))
    score = evaluate(model, test, n_bins=17, seed=seed)
    ll, bpd = score["log_likelihood"], score["bits_per_dim"]
    model = model.cpu()  # sampling 64 images and inpainting 64 are small jobs
    samples, _ = draw(model, 64, generator=torch.Generator().manual_seed(seed))
    save_image_grid(samples.clamp(-1, 1), out_dir / "nice_digits_samples.png")
    progress.step(2, 2, "inpainting the lower half")
    known = torch.ones(1, 1, 8, 8)
    known[..., 4:, :] = 0
    x = test[:64]
    mean_fill = train.mean(0, keepdim=True).expand_as(x)
    filled = inpaint(model.log_prob, x, known, init=mean_fill.clone(), steps=s.inpaint_steps)
    hidden = (1 - known).bool().expand_as(x)
    mse = float((filled - x)[hidden].pow(2).mean())
    mse_mean = float((mean_fill - x)[hidden].pow(2).mean())
    save_image_grid(torch.cat([x[:16], (known * x)[:16], filled[:16]]), out_dir / "nice_digits_inpainting.png", nrow=16)
    table = Table(
        "NICE on the 8x8 digits (dequantised, 17 levels)",
        ["quantity", "value"],
        [
            ["test log-likelihood (nats per image)", f"{ll:.2f}"],
            ["test bits/dim", f"{bpd:.3f}"],
            ["inpainting MSE of the lower half (gradient ascent on log p)", f"{mse:.4f}"],
            ["the same, filled with the training mean (its start)", f"{mse_mean:.4f}"],
        ],
        note=f"{s.digits_steps} steps; uniform noise is 4.09 bits/dim (log2 17). Reported only.",
    )
    figures = [
        Figure("NICE samples (digits)", "nice_digits_samples.png", "64 samples of NICE trained on the 8x8 digits."),
        Figure("NICE inpainting", "nice_digits_inpainting.png", "Rows: test digits, lower half hidden, inpainted."),
    ]
    checks = [
        rules.check(
            "NICE inpainting (reported)",
            "MSE inpainted / MSE mean fill",
            "below 1",
            [mse / mse_mean],
            1.0,
            below=True,
            exact=True,
            role="reported",
        ),
    ]
    paper = [
        PaperNumber(
            "bits/dim, NICE on MNIST (28x28, 256 levels)",
            "about 4.4",
            "the note's anchor (Dinh et al. 2015)",
            f"{bpd:.3f} bits/dim on 8x8 digits with 17 levels (other data and scale)",
        )
    ]
    return Section(
        tables=[table],
        figures=figures,
        checks=checks,
        paper=paper,
        values={"digits_bits_per_dim": bpd, "inpaint_mse": mse, "mean_fill_mse": mse_mean},
    )


def side_by_side_section(s: Settings, seed: int, out_dir: Path, progress: Progress) -> Section:
    """Part 4: DDPM (sampled by DDIM, eta 0) vs flow matching and rectified flow (Euler), the same MLP
    and training budget: MMD^2 of samples to held-out data against the number of network evaluations."""
    from notelab.diffusion.pipeline import DiffusionConfig, train_diffusion

    train_x = load_dataset(s.density, n=s.n_train, seed=seed).x
    test_x = load_dataset(s.density, n=s.n_test, seed=seed + 1).x
    net = {"hidden": s.side_hidden, "n_layers": s.side_depth, "time_dim": 32}
    config = _train_config(s, s.side_steps, seed)
    progress.step(1, 3, f"DDPM, {s.side_steps} steps")
    ddpm_config = DiffusionConfig.for_shape((2,), net_config=net)
    ddpm = train_diffusion(load_dataset(s.density, n=s.n_train, seed=seed), out_dir / "ddpm", config, ddpm_config)
    models = {}
    for i, name in enumerate(("fm", "rf")):
        progress.step(2 + i, 3, f"{name}, {s.side_steps} steps")
        spec = FlowSpec(model=name, hidden=s.side_hidden, depth=s.side_depth, reflow_pairs=s.reflow_pairs)
        models[name], _ = train_flow(spec, train_x, config)
    params = {
        "ddpm": sum(p.numel() for p in ddpm.parameters()),
        **{k: sum(p.numel() for p in m.parameters()) for k, m in models.items()},
    }
    n = s.n_test
    scores: dict[str, list[float]] = {"DDPM + DDIM (eta 0)": [], "flow matching + Euler": [], "2-RF + Euler": []}
    for nfe in s.side_nfe:
        g = torch.Generator().manual_seed(seed + 11)
        x = ddpm.sample(n, sampler="ddim", steps=nfe, eta=0.0, spacing="trailing", generator=g)
        scores["DDPM + DDIM (eta 0)"].append(mmd(x, test_x))
        for label, m in (("flow matching + Euler", models["fm"]), ("2-RF + Euler", models["rf"])):
            x0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed + 11))
            scores[label].append(mmd(m.sample(n, Solver("euler", steps=nfe), x0=x0)[0], test_x))
    adaptive = {k: m.sample(n, Solver("dopri5", rtol=1e-5, atol=1e-5))[1] for k, m in models.items()}
    line_png(
        {k: (list(s.side_nfe), v) for k, v in scores.items()},
        out_dir / "side_by_side.png",
        xlabel="network evaluations per sample",
        ylabel="MMD^2 to held-out data",
        logx=True,
        logy=True,
        marker="o",
    )
    table = Table(
        f"Flows and diffusion side by side on {s.density}: MMD^2 (x 1e3) against network evaluations",
        ["sampler", *[str(k) for k in s.side_nfe]],
        [[k, *[f"{1e3 * v:.2f}" for v in vs]] for k, vs in scores.items()],
        note=f"One MLP shape for all ({params['ddpm']:,} parameters in the DDPM, {params['fm']:,} in each flow: "
        f"only the time scaling differs), {s.side_steps} steps each; DDIM with trailing timesteps. dopri5 needs "
        f"{adaptive['fm']} NFE for flow matching and {adaptive['rf']} for 2-RF (rtol = atol = 1e-5).",
    )
    figure = Figure("Flows and diffusion side by side", "side_by_side.png", "Sample quality against NFE.")
    k10 = s.side_nfe.index(10) if 10 in s.side_nfe else -1
    checks = [
        rules.check(
            "side by side (reported)",
            f"MMD^2 at {s.side_nfe[k10]} NFE: DDIM - flow matching",
            "above 0: flow matching better",
            [scores["DDPM + DDIM (eta 0)"][k10] - scores["flow matching + Euler"][k10]],
            0.0,
            below=False,
            exact=True,
            role="reported",
            scale=1e3,
            unit="e-3",
        )
    ]
    values = {"side_mmd": scores, "side_parameters": params, "side_dopri5_nfe": adaptive}
    return Section(tables=[table], figures=[figure], checks=checks, values=values)


def run(out_dir: Path, quick: bool = False, seed: int = 0, progress: Progress | None = None) -> ClaimResult:
    out_dir, progress, t_start = begin(out_dir, seed, progress)
    s = QUICK if quick else FULL
    sections: list[Section] = []
    with one_thread(quick):
        with progress.part(f"2-D densities: {', '.join(s.models)} x {s.seeds} seeds"):
            sections.append(density_section(s, seed, out_dir, progress))
        with progress.part("rectified flow and reflow"):
            sections.append(reflow_section(s, seed, progress))
        with progress.part("NICE on digits"):
            sections.append(digits_section(s, seed, out_dir, progress))
        if s.side_steps:
            with progress.part("flows and diffusion side by side"):
                sections.append(side_by_side_section(s, seed, out_dir, progress))
    checks = [c for sec in sections for c in sec.checks]
    lls = sections[0].values["log_likelihood"]
    best = max(lls, key=lambda m: statistics.fmean(lls[m]))
    groups = rules.group_verdicts(checks)
    summary = (
        f"Test log-likelihood on {s.density} (true density {sections[0].values['true_log_likelihood']:.3f}): "
        + ", ".join(f"{m} {mean_std(v, 3)}" for m, v in lls.items())
        + f"; best {best}. "
        + " ".join(f"{g}: {v}." for g, v in groups.items())
        + f" NICE on digits: {sections[2].values['digits_bits_per_dim']:.3f} bits/dim."
        + (" Quick run: small models trained briefly; the full run is the one to quote." if quick else "")
    )
    settings = {"quick": quick, "seed": seed, **dataclasses.asdict(s)}
    settings.update({k: v for sec in sections for k, v in sec.values.items()})
    return ClaimResult.from_sections(
        NAME, TITLE, CLAIM, sections, summary=summary, settings=settings, t_start=t_start, progress=progress
    )
