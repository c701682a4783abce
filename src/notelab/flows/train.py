"""Training, likelihood and sampling of every flow of the family through one interface.

``MODELS`` names the five models the CLI and the reproduce claim use:

=========  ==========================================  ==============================================
name       model                                       training loss (through ``notelab.train.fit``)
=========  ==========================================  ==============================================
nice       :class:`CouplingFlow`, additive, logistic   maximum likelihood (:func:`nll_loss`)
realnvp    :class:`CouplingFlow`, affine, Gaussian     maximum likelihood; on images RealNVP's multi-scale
                                                       conv couplings (``arch`` "auto")
cnf        :class:`ContinuousFlow`                     maximum likelihood through the ODE (FFJORD)
fm         :class:`ContinuousFlow`                     conditional flow matching, Lipman's OT path
rf         :class:`ContinuousFlow`                     rectified flow: linear path, then one reflow
=========  ==========================================  ==============================================

Images are dequantised (:mod:`notelab.flows.dequantize`) in every loss, so that every model's
log-likelihood is of the same continuous density and bits/dim compare.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from notelab.core.config import load_json
from notelab.core.errors import CheckpointError, ConfigError, unknown_name
from notelab.core.io import atomic_write_text
from notelab.core.runtime import seed_everything
from notelab.eval.likelihood import bits_per_dim
from notelab.flows.continuous import ContinuousFlow, ContinuousFlowConfig, Solver, cnf_nll_loss
from notelab.flows.coupling import ARCHS, CouplingFlow, CouplingFlowConfig
from notelab.flows.dequantize import dequantize, nll_loss
from notelab.flows.matching import PATHS, FlowMatchingLoss, LinearPath, independent, ot_pairs, reflow_pairs
from notelab.train import FitResult, TrainConfig, fit, unwrap_model

MODELS = ("nice", "realnvp", "cnf", "fm", "rf")
PAIRINGS = {"independent": independent, "ot": ot_pairs}
FLOW_FILE = "flow.json"  # {"model": "nice", "n_bins": 17 | null}: what a run folder holds


@dataclass
class FlowSpec:
    model: str = "nice"  # one of MODELS
    n_bins: int | None = None  # levels of discrete data (17 digits, 256 8-bit images); None: continuous points
    hidden: int = 128  # width of the coupling conditioners / the vector field MLP
    depth: int = 3  # hidden layers of each coupling conditioner / residual layers of the field MLP
    solver: str = "rk4"  # ODE solver of the CNF's training (fixed steps keep the cost known)
    solver_steps: int = 8  # its steps
    divergence: str = "exact"  # "exact" or "hutchinson" in CNF training
    path: str = "ot"  # fm: probability path, "ot" (Lipman, sigma_min 1e-4), "linear" (I-CFM) or "vp"
    pairing: str = "independent"  # fm / rf: coupling of noise and data, "independent" or "ot" (minibatch OT-CFM)
    reflow_fraction: float = 0.5  # rf: share of the steps spent on reflow (the rest on 1-RF)
    reflow_pairs: int = 4096  # rf: pairs (x_0, ODE(x_0)) generated for reflow
    arch: str = "auto"  # nice / realnvp: "mlp", "multiscale" or "auto" (multiscale for realnvp on images)

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise unknown_name("flow model", self.model, MODELS)
        if self.n_bins is not None and (isinstance(self.n_bins, bool) or self.n_bins < 2):
            raise ConfigError(f"FlowSpec.n_bins: expected None or an integer >= 2, got {self.n_bins!r}")
        if self.path not in PATHS:
            raise unknown_name("probability path", self.path, PATHS)
        if self.pairing not in PAIRINGS:
            raise unknown_name("pairing", self.pairing, PAIRINGS)
        if not 0 < self.reflow_fraction < 1:
            raise ConfigError(f"FlowSpec.reflow_fraction: expected a number in (0, 1), got {self.reflow_fraction}")
        if self.arch not in ("auto", *ARCHS):
            raise unknown_name("arch", self.arch, ("auto", *ARCHS))
        if self.arch == "multiscale" and self.model not in ("nice", "realnvp"):
            raise ConfigError(f"FlowSpec.arch: 'multiscale' applies to nice and realnvp, got model {self.model!r}")
        Solver(self.solver, self.solver_steps)


def build_model(spec: FlowSpec, sample_shape: tuple[int, ...]) -> nn.Module:
    """A fresh model of ``spec.model`` for samples of ``sample_shape``."""
    if spec.model in ("nice", "realnvp"):
        config = CouplingFlowConfig.from_name(
            spec.model,
            sample_shape=sample_shape,
            hidden=spec.hidden,
            depth=spec.depth,
            **coupling_arch(spec, sample_shape),
        )
        return CouplingFlow(config)
    config = ContinuousFlowConfig(sample_shape=sample_shape)
    if config.net == "mlp":
        mlp = {"hidden": spec.hidden, "n_layers": spec.depth}
        config = ContinuousFlowConfig(sample_shape=sample_shape, net_config=mlp)
    return ContinuousFlow(config)


def coupling_arch(spec: FlowSpec, sample_shape: tuple[int, ...]) -> dict[str, Any]:
    """``arch`` and ``n_scales`` of a coupling flow: ``spec.arch``, or for "auto" RealNVP's multi-scale
    flow on images whose sides halve (twice if they can, else once), MLP couplings otherwise."""
    sides = sample_shape[1:] if len(sample_shape) == 3 else ()
    n_scales = 2 if sides and all(s % 4 == 0 for s in sides) else 1
    arch = spec.arch
    if arch == "auto":
        arch = "multiscale" if spec.model == "realnvp" and sides and all(s % 2 == 0 for s in sides) else "mlp"
    return {"arch": arch, "n_scales": n_scales} if arch == "multiscale" else {"arch": arch}


class Dequantized:
    """A loss applied to the batch dequantised with ``n_bins`` levels (images), or as is (``None``)."""

    def __init__(self, loss: Any, n_bins: int | None) -> None:
        self.loss = loss
        self.n_bins = n_bins

    def __call__(self, model: nn.Module, batch: torch.Tensor, generator: torch.Generator) -> Any:
        if self.n_bins is not None:
            batch = dequantize(batch, self.n_bins, generator)
        return self.loss(model, batch, generator)


def _cnf_loss(spec: FlowSpec) -> Any:
    solver = Solver(spec.solver, spec.solver_steps)

    def loss(model: nn.Module, batch: torch.Tensor, generator: torch.Generator) -> Any:
        # log_prob is not the module's forward, so it runs on the unwrapped model (single process).
        return cnf_nll_loss(unwrap_model(model), batch, generator, solver, spec.divergence)

    return loss


def loss_for(spec: FlowSpec) -> Any:
    """``fit``'s loss for ``spec.model`` (the first stage, for rf)."""
    if spec.model in ("nice", "realnvp"):
        return partial(nll_loss, n_bins=spec.n_bins)
    if spec.model == "cnf":
        return Dequantized(_cnf_loss(spec), spec.n_bins)
    # rectified flow is the linear path by definition; flow matching takes the spec's
    path = PATHS[spec.path]() if spec.model == "fm" else LinearPath()
    return Dequantized(FlowMatchingLoss(path, PAIRINGS[spec.pairing]), spec.n_bins)


def train_flow(
    spec: FlowSpec, data: torch.Tensor, train_config: TrainConfig, out_dir: str | os.PathLike | None = None
) -> tuple[nn.Module, list[FitResult]]:
    """Train ``spec.model`` on ``data`` (N, *sample_shape) with ``fit``; writes the run folder when ``out_dir``.

    rf trains 1-RF for ``(1 - reflow_fraction) * steps``, then draws ``reflow_pairs`` pairs
    ``(x_0, ODE(x_0))`` with 1-RF (dopri5) and trains on them from 1-RF's weights (2-RF) for the
    rest. The folder gets ``config.json`` + ``model.safetensors`` + ``flow.json`` (+ fit's log and
    checkpoint; rf's reflow stage in ``reflow/``).
    """
    seed_everything(train_config.seed)
    model = build_model(spec, tuple(data.shape[1:]))
    cfg = dataclasses.replace(train_config, out_dir=str(out_dir) if out_dir is not None else None)
    results = []
    if spec.model != "rf":
        results.append(fit(model, loss_for(spec), data, cfg))
    else:
        first = max(1, round(cfg.steps * (1 - spec.reflow_fraction)))
        results.append(fit(model, loss_for(spec), data, dataclasses.replace(cfg, steps=first)))
        generator = torch.Generator(device=results[0].model.device).manual_seed(cfg.seed + 1)
        pairs = reflow_pairs(results[0].model, spec.reflow_pairs, Solver("dopri5", rtol=1e-4, atol=1e-4), generator)
        reflow_dir = None if out_dir is None else str(Path(out_dir) / "reflow")
        cfg2 = dataclasses.replace(cfg, steps=max(1, cfg.steps - first), out_dir=reflow_dir)
        # A copy: results[0].model stays 1-RF, the reflow stage starts from its weights (2-RF).
        second = copy.deepcopy(results[0].model).train()
        results.append(fit(second, FlowMatchingLoss(LinearPath(), pairs=True), pairs.cpu(), cfg2))
    final = results[-1].model.eval()
    if out_dir is not None:
        save_flow(final, spec, out_dir)
    return final, results


def save_flow(model: nn.Module, spec: FlowSpec, out_dir: str | os.PathLike) -> None:
    """``model.save_pretrained(out_dir)`` and ``flow.json`` naming the model kind and its data's bins."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    atomic_write_text(out_dir / FLOW_FILE, json.dumps(dataclasses.asdict(spec), indent=2) + "\n")


def load_flow(
    path: str | os.PathLike, device: str | torch.device = "cpu", allow_large: bool = False
) -> tuple[nn.Module, FlowSpec]:
    """A trained flow and its :class:`FlowSpec` from a run folder written by :func:`train_flow`."""
    path = Path(path)
    if not (path / FLOW_FILE).is_file():
        raise CheckpointError(f"{path}: expected a flow run folder with {FLOW_FILE}, found none")
    try:
        spec = FlowSpec(**load_json(path / FLOW_FILE))
    except (TypeError, ConfigError) as e:
        raise CheckpointError(f"{path / FLOW_FILE}: {e}") from e
    cls = CouplingFlow if spec.model in ("nice", "realnvp") else ContinuousFlow
    return cls.from_pretrained(path, device=device, allow_large=allow_large).eval(), spec


def log_likelihood(
    model: nn.Module,
    x: torch.Tensor,
    solver: Solver | None = None,
    method: str = "exact",
    generator: torch.Generator | None = None,
    batch: int = 512,
) -> torch.Tensor:
    """``log p(x)`` per row (nats) of any flow here; a continuous flow solves its ODE with ``solver``
    (default dopri5, rtol = atol = 1e-5) and ``method`` ("exact" or "hutchinson") divergence."""
    device = next(iter(model.parameters())).device
    out = []
    with torch.no_grad():
        for chunk in x.split(batch):
            chunk = chunk.to(device)  # the model's device; the result comes back on x's
            if isinstance(model, ContinuousFlow):
                solver = solver or Solver("dopri5", rtol=1e-5, atol=1e-5)
                out.append(model.log_prob(chunk, solver, method=method, generator=generator).to(x.device))
            else:
                out.append(model.log_prob(chunk).to(x.device))
    return torch.cat(out)


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    n_bins: int | None = None,
    solver: Solver | None = None,
    method: str = "exact",
    seed: int = 0,
) -> dict[str, float]:
    """Mean test log-likelihood (nats per example) and, for discrete data (``n_bins``), bits/dim of the
    data dequantised with noise seeded by ``seed``."""
    x = x.to(next(iter(model.parameters())).device)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    if n_bins is not None:
        x = dequantize(x, n_bins, generator)
    mean = float(log_likelihood(model, x, solver, method, generator).mean())
    out = {"log_likelihood": mean}
    if n_bins is not None:
        out["bits_per_dim"] = float(bits_per_dim(mean, x[0].numel(), n_bins))
    return out


def draw(
    model: nn.Module, n: int, solver: Solver | None = None, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, int]:
    """``n`` samples of any flow here and the number of network evaluations (1 pass for a coupling flow)."""
    with torch.no_grad():
        if isinstance(model, ContinuousFlow):
            return model.sample(n, solver or Solver("dopri5", rtol=1e-5, atol=1e-5), generator)
        return model.sample(n, generator), 1
