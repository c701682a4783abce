"""An autoregressive prior over VQ-VAE codes: a ``notelab.lm.Llama`` over the flattened code grid.

The grid (h, w) of a trained VQ-VAE is read in raster order and a start token ``K`` (one past the
codes) is put in front, so the vocabulary is ``K + 1``::

    p(z) = prod_{t=1..hw} p_theta(z_t | START, z_1 .. z_{t-1})

(the paper's PixelCNN replaced by a Transformer decoder, as in VQ-VAE-2 / VQGAN). Training is
``notelab.lm.train.next_token_loss`` through ``notelab.train.fit``; sampling is
``notelab.lm.generate``; generated images are ``decode(sampled codes)``.

Bits per dimension as in the paper (sec. 4.1: ``log p(x) ~ log p(x | z_q(x)) p(z_q(x))``) over
the ``C H W`` pixel dims of the image::

    prior bits/dim = -log2 p(z) / (C H W)
    bits/dim bound = -(log p(x | z) + log p(z)) / (C H W ln 2) + log2(n_bins / 2)

with ``p(x | z) = N(x; decode(z), sigma^2 I)`` on images in [-1, 1], ``sigma^2`` the decoder's
mean squared error on the training images (its maximum-likelihood value), and the last term the
change of scale from [-1, 1] to ``n_bins`` integer levels (``notelab.eval.bits_per_dim``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from notelab.core.errors import ConfigError, DataError, ShapeError
from notelab.core.runtime import seed_everything
from notelab.eval import bits_per_dim
from notelab.lm import Llama, LlamaConfig, generate
from notelab.lm.train import next_token_loss
from notelab.train import FitResult, TrainConfig, fit
from notelab.vq.model import VQVAE


def prior_config(
    codebook_size: int, grid: tuple[int, int], dim: int = 64, n_layers: int = 2, n_heads: int = 4
) -> LlamaConfig:
    """A small Llama over ``K + 1`` tokens with room for the start token and the whole grid."""
    return LlamaConfig(
        vocab_size=codebook_size + 1,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        multiple_of=16,
        max_seq_len=1 + grid[0] * grid[1],
    )


def code_sequences(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """(B, h, w) code grids -> (B, 1 + h w) token rows ``[K, z_1, ..., z_hw]`` in raster order."""
    if codes.ndim != 3:
        raise ShapeError(f"code_sequences: expected code grids (B, h, w), got shape {tuple(codes.shape)}")
    flat = codes.reshape(codes.shape[0], -1).long()
    start = torch.full((codes.shape[0], 1), codebook_size, dtype=torch.long, device=codes.device)
    return torch.cat([start, flat], 1)


def check_prior(prior: Llama, vqvae: VQVAE) -> None:
    """:class:`ConfigError` unless the prior's vocabulary and context fit the VQ-VAE's codes."""
    c, g = vqvae.config, vqvae.config.grid
    if prior.config.vocab_size != c.codebook_size + 1:
        raise ConfigError(
            f"prior: expected vocab_size {c.codebook_size + 1} (K + start token), got {prior.config.vocab_size}"
        )
    if prior.config.max_seq_len < 1 + g[0] * g[1]:
        raise ConfigError(f"prior: expected max_seq_len >= {1 + g[0] * g[1]}, got {prior.config.max_seq_len}")


@torch.no_grad()
def encode_dataset(vqvae: VQVAE, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Code grids (N, h, w) of images ``x`` (N, C, H, W), int64 on the CPU."""
    device = next(vqvae.parameters()).device
    vqvae.eval()
    return torch.cat([vqvae.encode(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])


def train_prior(
    codes: torch.Tensor,
    codebook_size: int,
    train_config: TrainConfig,
    config: LlamaConfig | None = None,
    callbacks: tuple = (),
    val_codes: torch.Tensor | None = None,
    eval_every: int = 100,
) -> FitResult:
    """Fit a Llama prior to code grids (N, h, w) with ``next_token_loss`` through ``notelab.train.fit``.

    With ``val_codes`` the prior's mean NLL on them is measured every ``eval_every`` steps and at
    the end, and the weights of the best measurement are the ones returned (early stopping: a few
    thousand code grids are memorised within a few epochs, and the held-out NLL then climbs past a
    uniform prior's). ``result.history`` gets ``{"step", "val_nll"}`` records; under DDP the
    measurement runs on rank 0 only (fit's callbacks do), so use it in one process.
    """
    grid = (int(codes.shape[1]), int(codes.shape[2]))
    config = config or prior_config(codebook_size, grid)
    if config.vocab_size != codebook_size + 1 or config.max_seq_len < 1 + grid[0] * grid[1]:
        raise ConfigError(
            f"prior config: expected vocab_size {codebook_size + 1} and max_seq_len >= {1 + grid[0] * grid[1]}, "
            f"got {config.vocab_size} and {config.max_seq_len}"
        )
    if eval_every < 1:
        raise ConfigError(f"eval_every: expected a number of steps >= 1, got {eval_every}")
    seed_everything(train_config.seed)
    model = Llama(config)
    best: dict = {"nll": math.inf, "state": None}
    curve: list[dict[str, float]] = []

    def keep_best(step: int, logs: dict) -> None:
        if step % eval_every and step != train_config.steps:
            return
        nll = float(code_nll(model, val_codes, codebook_size).mean())
        curve.append({"step": step, "val_nll": nll})
        if nll < best["nll"]:
            best.update(nll=nll, state={k: v.detach().clone() for k, v in model.state_dict().items()})

    extra = (keep_best,) if val_codes is not None else ()
    data = code_sequences(codes, codebook_size)
    result = fit(model, next_token_loss, data, train_config, callbacks=(*callbacks, *extra))
    if best["state"] is not None:
        result.model.load_state_dict(best["state"])
        result.history.extend(curve)
    return result


@torch.no_grad()
def code_nll(prior: Llama, codes: torch.Tensor, codebook_size: int, batch_size: int = 256) -> torch.Tensor:
    """``-log p(z)`` in nats per code grid (N,), from the prior's next-token probabilities."""
    device = next(prior.parameters()).device
    rows = code_sequences(codes, codebook_size)
    was = prior.training
    prior.eval()
    out = []
    for i in range(0, len(rows), batch_size):
        w = rows[i : i + batch_size].to(device)
        logits = prior(w[:, :-1]).float()
        out.append(F.cross_entropy(logits.transpose(1, 2), w[:, 1:], reduction="none").sum(1).cpu())
    prior.train(was)
    return torch.cat(out)


def prior_bits_per_dim(nll: torch.Tensor, pixel_dims: int) -> float:
    """``-log2 p(z) / (C H W)``: the prior's bits spread over the image's dims."""
    return float(nll.mean()) / (pixel_dims * math.log(2))


def gaussian_log_likelihood(x: torch.Tensor, x_hat: torch.Tensor, variance: float) -> torch.Tensor:
    """``log N(x; x_hat, variance I)`` per image (N,), nats."""
    d = x[0].numel()
    sq = (x - x_hat).pow(2).flatten(1).sum(1)
    return -0.5 * sq / variance - 0.5 * d * math.log(2 * math.pi * variance)


def bits_per_dim_bound(
    x: torch.Tensor, x_hat: torch.Tensor, nll_codes: torch.Tensor, variance: float, n_bins: int = 256
) -> float:
    """The paper's ``-log p(x|z) p(z)`` in bits per pixel dim of the ``n_bins``-level data (module docstring)."""
    if not (math.isfinite(variance) and variance > 0):
        raise ConfigError(f"variance: expected a finite number > 0, got {variance}")
    log_p = gaussian_log_likelihood(x, x_hat, variance) - nll_codes
    return float(bits_per_dim(log_p, x[0].numel(), n_bins=n_bins).mean())


@torch.no_grad()
def sample_codes(
    prior: Llama,
    n: int,
    grid: tuple[int, int],
    codebook_size: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    tries: int = 32,
) -> torch.Tensor:
    """``n`` code grids (n, h, w) drawn from the prior with ``notelab.lm.generate``.

    The start token is never a training target, so the prior gives it almost no mass; a row that
    draws it anyway stops there (a stop token) and is drawn again whole with the next seeds (``tries``
    times, then a DataError): the rows returned are exact draws from ``p(z | no start token)``.
    """
    if n < 1:
        raise ConfigError(f"n: expected at least 1 sample, got {n}")
    length = grid[0] * grid[1]
    kw = {"temperature": temperature, "seed": seed, "stop_tokens": (codebook_size,)}
    if top_k is not None:
        kw["top_k"] = top_k
    if top_p is not None:
        kw["top_p"] = top_p
    rows: list[list[int] | None] = [None] * n
    for attempt in range(tries):
        todo = [i for i, r in enumerate(rows) if r is None]
        if not todo:
            break
        kw["seed"] = seed + attempt * n
        out = generate(prior, [[codebook_size]] * len(todo), length, **kw)
        for i, toks in zip(todo, out):
            if len(toks) == length and max(toks) < codebook_size:
                rows[i] = toks
    if any(r is None for r in rows):
        raise DataError(
            f"sample_codes: the prior kept drawing the start token in {rows.count(None)} of {n} rows "
            f"over {tries} tries; expected a trained prior (train it longer)"
        )
    return torch.tensor(rows, dtype=torch.long).reshape(n, *grid)


def save_prior(result: FitResult, out_dir: str | os.PathLike) -> Llama:
    """Write the trained prior (``config.json`` + ``model.safetensors``) into ``out_dir``; returns it on the CPU."""
    model = result.model.cpu().eval()
    model.save_pretrained(Path(out_dir))
    return model
