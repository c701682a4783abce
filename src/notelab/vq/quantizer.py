"""Vector quantisation with a straight-through estimator (van den Oord et al. 2017, VQ-VAE).

Each encoder vector ``z`` (D,) is replaced by its nearest codebook vector ``e_k`` (K x D)::

    k(z)  = argmin_i ||z - e_i||^2 = argmin_i ( ||e_i||^2 - 2 z.e_i )        (eq. 1; ||z||^2 is shared)
    z_q   = z + sg[e_k - z]                                                   straight-through (sec. 3.2):
                                                                              forward e_k, backward identity
    L_vq  = ||sg[z] - e_k||^2  +  beta ||z - sg[e_k]||^2                      (eq. 3, beta = 0.25)

(``||.||^2`` averaged over the elements, as Sonnet does). The distances are one matmul,
``||z||^2 - 2 z E^T + ||E||^2`` (N x K), never an (N, K, D) difference tensor.

With ``ema=True`` the codebook gets no gradient and no codebook loss; it follows exponential
moving averages of the assignments (VQ-VAE appendix A.1, eqs. 6-8; the VQ-VAE-2 / Sonnet
``VectorQuantizerEMA`` formulation: zero-initialised, debiased averages and Laplace smoothing)::

    N_i <- EMA_gamma( n_i ),   m_i <- EMA_gamma( sum_{j: k(z_j) = i} z_j )     EMA(x)_t = h_t / (1 - gamma^t),
                                                                              h_t = gamma h_{t-1} + (1 - gamma) x_t
    N'_i = (N_i + eps) / (n + K eps) * n,   n = sum_i N_i                      Laplace smoothing: no division by 0
    e_i  = m_i / N'_i

Dead codes (debiased usage EMA ``N_i`` below ``dead_code_threshold`` vectors per batch) are
restarted at encoder outputs of the current batch (Dhariwal et al. 2020, Jukebox: "random restarts").
Under ``torch.distributed`` the counts and sums are all-reduced before any update, and the
random choices (k-means initialisation, restart) are made on rank 0 and broadcast, so every
rank holds the same codebook.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from notelab.core.errors import ConfigError, DataError, ShapeError

# ------------------------------------------------------------------------------------- pure math


def squared_distances(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``||z_n - e_k||^2`` (N, K) as ``||z||^2 - 2 z E^T + ||E||^2``: one matmul, no (N, K, D) tensor."""
    z_sq = z.pow(2).sum(1, keepdim=True)
    e_sq = codebook.pow(2).sum(1)
    return torch.addmm(e_sq.unsqueeze(0), z, codebook.t(), alpha=-2.0).add_(z_sq)


def nearest_codes(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index (N,) of the nearest codebook row of each row of ``z`` (eq. 1), computed in float32."""
    return squared_distances(z.float(), codebook.float()).argmin(1)


def straight_through(z: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """``z + sg[q - z]``: the value of ``q``, the gradient of ``z`` (the identity to the encoder)."""
    return z + (quantized - z).detach()


def vq_losses(z: torch.Tensor, quantized: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codebook loss ``||sg[z] - e||^2``, commitment loss ``||z - sg[e]||^2``), element means (eq. 3)."""
    return F.mse_loss(quantized, z.detach()), F.mse_loss(z, quantized.detach())


def code_counts(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """``n_i``: how many vectors were assigned to each code (K,), float32."""
    return torch.bincount(indices, minlength=codebook_size).float()


def code_sums(z: torch.Tensor, indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """``sum_{j: k(z_j) = i} z_j`` (K, D), float32."""
    out = torch.zeros(codebook_size, z.shape[1], device=z.device, dtype=torch.float32)
    return out.index_add_(0, indices, z.float())


def ema_step(hidden: torch.Tensor, value: torch.Tensor, decay: float) -> torch.Tensor:
    """``h_t = gamma h_{t-1} + (1 - gamma) x_t`` (the un-debiased accumulator)."""
    return hidden * decay + value * (1.0 - decay)


def debias(hidden: torch.Tensor, decay: float, steps: int) -> torch.Tensor:
    """``h_t / (1 - gamma^t)``: the zero-initialised average without its bias towards 0."""
    return hidden / (1.0 - decay**steps)


def laplace_smooth(counts: torch.Tensor, eps: float) -> torch.Tensor:
    """``N'_i = (N_i + eps) / (n + K eps) * n``: same total ``n``, never zero."""
    n = counts.sum()
    return (counts + eps) / (n + counts.numel() * eps) * n


def ema_codebook(counts: torch.Tensor, sums: torch.Tensor, eps: float) -> torch.Tensor:
    """``e_i = m_i / N'_i`` from the averaged counts ``N`` (K,) and sums ``m`` (K, D)."""
    return sums / laplace_smooth(counts, eps).unsqueeze(1)


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """``exp(-sum_i p_i log p_i)`` of the code frequencies ``p = n / sum n``: K when all codes are used
    equally, 1 when one code takes everything."""
    p = counts / counts.sum().clamp_min(1e-12)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


def kmeans(x: torch.Tensor, k: int, iters: int = 10, generator: torch.Generator | None = None) -> torch.Tensor:
    """Lloyd's k-means on the rows of ``x`` (N, D) -> centres (k, D), from ``k`` random rows.

    A centre left without points keeps its place. Fewer rows than ``k``: rows drawn with replacement.
    """
    x = x.float()
    n = x.shape[0]
    if n >= k:
        pick = torch.randperm(n, generator=generator, device="cpu")[:k]
    else:
        pick = torch.randint(n, (k,), generator=generator, device="cpu")
    centres = x[pick.to(x.device)].clone()
    for _ in range(iters):
        idx = nearest_codes(x, centres)
        counts = code_counts(idx, k)
        sums = code_sums(x, idx, k)
        used = counts > 0
        centres[used] = sums[used] / counts[used].unsqueeze(1)
    return centres


# ----------------------------------------------------------------------------------- distributed


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks (in place) when a process group is running; ``t`` otherwise."""
    if _distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_from_first(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``t`` on every rank (in place), so random choices agree; ``t`` without a process group."""
    if _distributed():
        dist.broadcast(t, src=0)
    return t


# ------------------------------------------------------------------------------------- the module


def flatten_input(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, Any]:
    """``x`` as rows (N, D) and how to undo it: (B, D), (B, N, D) (channels last) or (B, D, H, W)."""
    if x.ndim == 2 and x.shape[1] == dim:
        return x, ("flat", x.shape)
    if x.ndim == 3 and x.shape[2] == dim:
        return x.reshape(-1, dim), ("seq", x.shape)
    if x.ndim == 4 and x.shape[1] == dim:
        return x.permute(0, 2, 3, 1).reshape(-1, dim), ("image", x.shape)
    raise ShapeError(
        f"VectorQuantizer: expected (B, {dim}), (B, N, {dim}) or (B, {dim}, H, W) with dim {dim}, "
        f"got shape {tuple(x.shape)}"
    )


def unflatten(rows: torch.Tensor, how: Any) -> torch.Tensor:
    """Inverse of :func:`flatten_input` for (N, D) rows; (N,) indices come back as (B,), (B, N), (B, H, W)."""
    kind, shape = how
    if rows.ndim == 1:
        return rows.reshape((shape[0], *shape[2:]) if kind == "image" else shape[:-1])
    if kind == "image":
        b, d, h, w = shape
        return rows.reshape(b, h, w, d).permute(0, 3, 1, 2)
    return rows.reshape(shape)


class VectorQuantizer(nn.Module):
    """Nearest-code quantisation with straight-through gradients, codebook / EMA updates, restarts.

    ``forward(x) -> (quantized, indices, loss, stats)``: ``quantized`` has ``x``'s shape and value
    ``e_k`` with the gradient of ``x``; ``indices`` are ``x``'s shape without the channel dim;
    ``loss = codebook_loss + beta * commitment_loss`` (EMA: ``beta * commitment_loss`` only);
    ``stats``: detached scalars ``codebook_loss``, ``commitment_loss``, ``perplexity`` (of this
    batch's code frequencies), ``usage`` (fraction of codes used in the batch), ``restarted``
    (codes restarted at this step). Training-mode calls with gradients enabled update the codebook
    statistics after the lookup (EMA, usage, restarts, k-means initialisation before it); eval-mode
    calls and calls under ``torch.no_grad()`` change nothing.
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        beta: float = 0.25,
        ema: bool = False,
        decay: float = 0.99,
        eps: float = 1e-5,
        dead_code_threshold: float = 0.0,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
    ) -> None:
        super().__init__()
        check_quantizer_args(codebook_size, dim, beta, decay, eps, dead_code_threshold)
        self.codebook_size, self.dim, self.beta = codebook_size, dim, float(beta)
        self.ema, self.decay, self.eps = bool(ema), float(decay), float(eps)
        self.dead_code_threshold, self.kmeans_init, self.kmeans_iters = (
            float(dead_code_threshold),
            kmeans_init,
            kmeans_iters,
        )
        # uniform(-sqrt(3), sqrt(3)): entries of unit variance, the scale of a freshly initialised encoder's output.
        init = (torch.rand(codebook_size, dim) * 2 - 1) * math.sqrt(3.0)
        if self.ema:
            self.register_buffer("codebook", init)
            self.register_buffer("ema_sums", torch.zeros(codebook_size, dim))
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("ema_counts", torch.zeros(codebook_size))  # usage EMA h_t (both modes)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # t of the EMAs
        self.register_buffer("initialized", torch.tensor(not kmeans_init))

    def extra_repr(self) -> str:
        return (
            f"codebook_size={self.codebook_size}, dim={self.dim}, beta={self.beta}, ema={self.ema}, "
            f"decay={self.decay}, dead_code_threshold={self.dead_code_threshold}, kmeans_init={self.kmeans_init}"
        )

    def usage(self) -> torch.Tensor:
        """Debiased EMA of the vectors each code received per training batch (K,); zeros before training."""
        t = int(self.steps)
        return debias(self.ema_counts, self.decay, t) if t > 0 else torch.zeros_like(self.ema_counts)

    def quantize_rows(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(nearest codes (N,), their vectors (N, D)) for rows ``z``; no gradient, no update."""
        idx = nearest_codes(z.detach(), self.codebook.detach())
        return idx, F.embedding(idx, self.codebook)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors ``(*indices.shape, D)``; indices outside [0, K) are a :class:`ShapeError`."""
        check_indices(indices, self.codebook_size)
        return F.embedding(indices.long(), self.codebook)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        z, how = flatten_input(x, self.dim)
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(z).all()):
            raise DataError("VectorQuantizer: expected finite inputs, got NaN or Inf")
        update = self.training and torch.is_grad_enabled()
        # The eager statistics get copies, not views: a view leaving a compiled region as an alias of one of
        # its intermediates was rebuilt from freed memory in testing (torch.compile on the CPU, torch 2.13).
        if update:
            self._kmeans_init(z.detach().clone())
        idx = nearest_codes(z.detach(), self.codebook.detach())
        # The codes searched are the codes returned: looked up before this step's update (as Sonnet does).
        e = F.embedding(idx, self.codebook).to(z.dtype)
        counts = code_counts(idx, self.codebook_size)
        restarted = torch.zeros((), device=z.device)
        if update:
            restarted = self._update(z.detach().clone(), idx, counts)
        codebook_loss, commitment_loss = vq_losses(z, e)
        loss = self.beta * commitment_loss if self.ema else codebook_loss + self.beta * commitment_loss
        quantized = unflatten(straight_through(z, e), how)
        stats = {
            "codebook_loss": codebook_loss.detach(),
            "commitment_loss": commitment_loss.detach(),
            "perplexity": perplexity(counts),
            "usage": (counts > 0).float().mean(),
            "restarted": restarted,
        }
        return quantized, unflatten(idx, how), loss, stats

    # The statistics run eagerly under torch.compile (fit compiles on CUDA): they branch on counts.
    @torch.compiler.disable
    @torch.no_grad()
    def _kmeans_init(self, z: torch.Tensor) -> None:
        if bool(self.initialized):
            return
        centres = broadcast_from_first(kmeans(z, self.codebook_size, self.kmeans_iters).contiguous())
        self.codebook.data.copy_(centres)
        self.initialized.fill_(True)

    @torch.compiler.disable
    @torch.no_grad()
    def _update(self, z: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """EMA statistics (and the EMA codebook), then restarts, from this rank's ``counts`` and all ranks'."""
        counts = all_reduce_sum(counts.clone())
        self.steps += 1
        t = int(self.steps)
        self.ema_counts.copy_(ema_step(self.ema_counts, counts, self.decay))
        if self.ema:
            sums = all_reduce_sum(code_sums(z, idx, self.codebook_size))
            self.ema_sums.copy_(ema_step(self.ema_sums, sums, self.decay))
            self.codebook.copy_(
                ema_codebook(debias(self.ema_counts, self.decay, t), debias(self.ema_sums, self.decay, t), self.eps)
            )
        if self.dead_code_threshold <= 0:
            return torch.zeros((), device=z.device)
        dead = self.usage() < self.dead_code_threshold
        n_dead = int(dead.sum())
        if n_dead == 0:
            return torch.zeros((), device=z.device)
        # Encoder outputs chosen on rank 0 (its batch), so every rank restarts the same codes alike.
        pick = torch.randint(z.shape[0], (n_dead,), device=z.device)
        fresh = broadcast_from_first(z[pick].float().contiguous())
        self.codebook.data[dead] = fresh.to(self.codebook.dtype)
        # A restarted code starts at the threshold: it is restarted again unless it gets used.
        bias = 1.0 - self.decay**t
        self.ema_counts[dead] = self.dead_code_threshold * bias
        if self.ema:
            smoothed = laplace_smooth(self.usage(), self.eps)
            self.ema_sums[dead] = fresh * (smoothed[dead] * bias).unsqueeze(1)
        return torch.tensor(float(n_dead), device=z.device)


def check_quantizer_args(
    codebook_size: int, dim: int, beta: float, decay: float, eps: float, dead_code_threshold: float
) -> None:
    """One-line :class:`ConfigError` for the first bad hyper-parameter."""
    if not isinstance(codebook_size, int) or isinstance(codebook_size, bool) or codebook_size < 2:
        raise ConfigError(f"codebook_size: expected an integer >= 2, got {codebook_size!r}")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise ConfigError(f"dim: expected an integer >= 1, got {dim!r}")
    if not (math.isfinite(beta) and beta >= 0):
        raise ConfigError(f"beta: expected a finite number >= 0, got {beta!r}")
    if not 0 < decay < 1:
        raise ConfigError(f"decay: expected 0 < decay < 1, got {decay!r}")
    if not (math.isfinite(eps) and eps > 0):
        raise ConfigError(f"eps: expected a finite number > 0, got {eps!r}")
    if not (math.isfinite(dead_code_threshold) and dead_code_threshold >= 0):
        raise ConfigError(f"dead_code_threshold: expected a finite number >= 0 (0: off), got {dead_code_threshold!r}")


def check_indices(indices: torch.Tensor, codebook_size: int) -> None:
    """:class:`ShapeError` unless ``indices`` are integers in [0, codebook_size)."""
    if indices.dtype.is_floating_point or indices.dtype == torch.bool or indices.is_complex():
        raise ShapeError(f"indices: expected integer code indices, got dtype {indices.dtype}")
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= codebook_size:
            raise ShapeError(f"indices: expected codes in [0, {codebook_size}), got codes in [{lo}, {hi}]")
