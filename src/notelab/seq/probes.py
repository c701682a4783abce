"""Probes of the Transformer-vs-RNN claim: training throughput and vanishing gradients.

- ``train_throughput``: training tokens per second (forward + backward, source plus target
  tokens) of several models at one sequence length, timed interleaved (best of N).
- ``input_gradient_norms``: ||d f / d x_t|| for the source embeddings x_t, where f = w . h_L is a
  fixed random projection of the encoder's state at the last source position (for the RNNs the
  forward direction's annotation, i.e. the recurrent path; for the Transformer the last encoder
  output). Against the distance L - 1 - t this is the vanishing-gradient picture of Bengio et al.
  (1994) and Pascanu et al. (2013, eq. 5): a product of t Jacobians for a recurrence, one
  attention step for the Transformer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from notelab.core.runtime import autocast, autocast_dtype
from notelab.seq.transformer import Transformer


def make_train_step(
    model: nn.Module,
    length: int,
    batch_size: int,
    *,
    device: torch.device | str = "cpu",
    precision: str = "auto",
    seed: int = 0,
    compile: bool = False,
) -> Callable[[], None]:
    """A closure running one forward + backward of the cross entropy on a random ``(batch, length)`` pair.

    Source and target both have ``length`` tokens; gradients are dropped after each call (no
    optimizer step: the optimizer's cost does not depend on the architecture's recurrence).
    """
    device = torch.device(device)
    model = model.to(device).train()
    c = model.config
    g = torch.Generator().manual_seed(seed)
    lo = max(c.pad_id, c.bos_id, c.eos_id) + 1
    src = torch.randint(lo, c.src_vocab, (batch_size, length), generator=g).to(device)
    tgt = torch.randint(lo, c.tgt_vocab, (batch_size, length), generator=g).to(device)
    dtype = autocast_dtype(device, precision)
    fwd = torch.compile(model) if compile else model

    def step() -> None:
        with autocast(device, dtype):
            logits = fwd(src, tgt)
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), tgt.flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def best_times(
    fns: dict[str, Callable[[], None]], repeats: int, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Best wall time of each function over ``repeats`` interleaved rounds (load bursts hit all alike)."""
    device = torch.device(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}


def train_throughput(
    models: dict[str, nn.Module],
    length: int,
    batch_size: int,
    *,
    repeats: int = 3,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    precision: str = "auto",
    seed: int = 0,
    compile: bool = False,
) -> dict[str, float]:
    """Training tokens/s of each model at ``length`` (forward + backward; source + target tokens).

    The models run interleaved, best of ``repeats`` after ``warmup`` rounds, so that they are
    compared under the same load: the ratios are the measurement, more than the absolute rates.
    """
    steps = {
        name: make_train_step(m, length, batch_size, device=device, precision=precision, seed=seed, compile=compile)
        for name, m in models.items()
    }
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    best = best_times(steps, repeats, device)
    return {name: 2 * batch_size * length / t for name, t in best.items()}


def input_gradient_norms(
    model: nn.Module, length: int, *, batch_size: int = 16, n_probes: int = 4, seed: int = 0
) -> torch.Tensor:
    """``(length,)`` mean ||d f / d x_t||, index = distance from the output (0 = last position).

    f = w . h_L for ``n_probes`` random unit vectors w (see the module docstring); dropout off.
    """
    was_training = model.training
    model.eval()
    c = model.config
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    lo = max(c.pad_id, c.bos_id, c.eos_id) + 1
    src = torch.randint(lo, c.src_vocab, (batch_size, length), generator=g).to(device)
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        out.retain_grad()
        captured.append(out)

    handle = model.src_embed.register_forward_hook(hook)
    try:
        memory = model.encode(src)
    finally:
        handle.remove()
    if isinstance(model, Transformer):
        last = memory[:, -1]
    else:
        last = memory.states[:, -1, : model.config.d_hidden]  # the forward direction
    x = captured[0]
    norms = torch.zeros(length, device=device)
    for _ in range(n_probes):
        w = torch.randn(last.shape[-1], generator=g).to(device)
        w = w / w.norm()
        (grad,) = torch.autograd.grad((last @ w).sum(), x, retain_graph=True)
        norms += grad.norm(dim=-1).mean(0)
    model.train(was_training)
    return (norms / n_probes).flip(0).detach().cpu()


def decay_rate(norms: torch.Tensor, max_distance: int | None = None) -> float:
    """Least-squares slope of log10 ||grad|| against distance (per step; more negative = faster vanishing).

    Fitted up to the first norm that underflowed to 0 (float32 runs out near 1e-38-1e-45).
    """
    y = norms[:max_distance].double()
    zero = (y <= 0).nonzero()
    y = y[: int(zero[0]) if len(zero) else len(y)].log10()
    t = torch.arange(len(y), dtype=torch.float64)
    t, y = t - t.mean(), y - y.mean()
    return float((t * y).sum() / (t * t).sum()) if len(y) > 1 else math.nan
