"""Cross-entropy fused with the output projection, in chunks: the (N, V) logits never exist in full.

For hidden states ``h_i`` (after the final norm), output matrix ``W`` (V x d) and targets ``y_i``,
over the ``N`` targets that are not ``ignore_index``::

    z_i  = W h_i                                      logits of token i (V,)
    L    = (1/N) sum_i ( logsumexp(z_i) - z_i[y_i] )  mean next-token cross-entropy
    dL/dz_i = (softmax(z_i) - onehot(y_i)) / N
    dL/dh_i = W^T dL/dz_i,        dL/dW = sum_i dL/dz_i h_i^T

The tokens are taken ``chunk`` at a time: a chunk's logits are computed, turned into its loss
and its ``dL/dz`` at once (softmax in float32), and ``dL/dz`` is multiplied straight into
``dL/dh`` and ``dL/dW`` before the next chunk; the gradients wait for ``backward``, which only
scales them by the incoming gradient. This is the "fused linear cross-entropy" of Liger Kernel
(Hsu et al. 2024, sec. 3.2; cf. Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language
Models"). Memory: one chunk of logits (``chunk x V`` in the matmul dtype and in float32) instead of
the ``N x V`` logits, their float32 copy and their gradient, which for Llama 3's 128,256-token
vocabulary at 8 x 2048 tokens are 4.2 + 8.4 + 8.4 GB. Arithmetic: the same three matmuls as
``F.cross_entropy(F.linear(h, W), y)`` with its backward, nothing recomputed.

Under autocast the matmuls run in the autocast dtype (W is cast once per call, as autocast would);
the softmax, the loss and the accumulated ``dL/dW`` are float32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from notelab.core.errors import ShapeError

CHUNK_ELEMENTS = 2**29  # logits per chunk: 4,096 tokens of a 128k vocabulary (2 GB in float32)


def default_chunk(vocab_size: int) -> int:
    """Tokens per chunk: ``CHUNK_ELEMENTS / V`` rounded down to a multiple of 128 (tensor-core friendly
    matmul sizes), at least 1. A few large matmuls keep the GPU busy; more chunks cost more passes
    over the float32 ``dL/dW`` accumulator."""
    chunk = CHUNK_ELEMENTS // vocab_size
    return chunk // 128 * 128 if chunk >= 128 else max(1, chunk)


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(hidden, weight)`` would compute in here: autocast's when it is on."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def chunk_loss_and_grad(
    z: torch.Tensor, y: torch.Tensor, keep: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's summed loss and ``dL/dz`` from its logits ``z`` (c, V), written for the compiler.

    ``sum_i keep_i (logsumexp(z_i) - z_i[y_i])`` and ``(softmax(z_i) - onehot(y_i)) * keep_i * scale``
    in ``z``'s dtype, the softmax in float32. Compiled (``torch.compile``), this is two passes over
    the chunk's logits (a row reduction, then the gradient), with no float32 copy in memory.
    """
    zf = z.float()
    lse = torch.logsumexp(zf, dim=-1, keepdim=True)
    loss = ((lse - zf.gather(1, y[:, None])).squeeze(1) * keep).sum()
    onehot = torch.arange(z.shape[-1], device=z.device) == y[:, None]
    g = (torch.exp(zf - lse) - onehot.float()) * (keep * scale)[:, None]
    return loss, g.to(z.dtype)


@functools.cache
def _compiled_chunk_loss_and_grad() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    # Built on first use only (nothing is compiled at import); one compiled kernel per chunk shape.
    return torch.compile(chunk_loss_and_grad, dynamic=False)


def _eager_chunk_loss_and_grad(
    z: torch.Tensor, y: torch.Tensor, keep: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``chunk_loss_and_grad`` without a compiler: in place, one float32 (c, V) buffer, ``dL/dz`` in ``z``'s storage."""
    logp = torch.log_softmax(z, dim=-1, dtype=torch.float32)
    loss = -(logp.gather(1, y[:, None]).squeeze(1) * keep).sum()
    p = logp.exp_()  # softmax, in place of log-softmax
    p.scatter_add_(1, y[:, None], -torch.ones_like(p[:, :1]))
    # (softmax - onehot) * keep * scale, cast into z's storage: one pass.
    return loss, torch.mul(p, (keep * scale)[:, None], out=z)


def _chunks(
    h: torch.Tensor,
    w: torch.Tensor,
    targets: torch.Tensor,
    chunk: int,
    ignore_index: int,
    grad_h: torch.Tensor | None,
    grad_w: torch.Tensor | None,
    compiled: bool,
) -> torch.Tensor:
    """The mean loss over all chunks; fills ``grad_h`` and accumulates ``grad_w`` (already divided by N) when given."""
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    count = (targets != ignore_index).sum().clamp(min=1)
    scale = 1.0 / count.float()
    step = _compiled_chunk_loss_and_grad() if compiled else _eager_chunk_loss_and_grad
    for start in range(0, h.shape[0], chunk):
        hc, yc = h[start : start + chunk], targets[start : start + chunk]
        keep = yc != ignore_index
        yk = torch.where(keep, yc, 0)
        z = hc @ w.t()  # (c, V) in the matmul dtype
        if grad_h is None and grad_w is None:
            logp = torch.log_softmax(z, dim=-1, dtype=torch.float32)
            total -= (logp.gather(1, yk[:, None]).squeeze(1) * keep).sum()
            continue
        loss, g = step(z, yk, keep, scale)
        del z
        total += loss
        if grad_h is not None:
            grad_h[start : start + chunk] = g @ w
        if grad_w is not None:
            grad_w += g.t() @ hc
    return total * scale


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk: int,
        ignore_index: int,
        dtype: torch.dtype,
        compiled: bool,
    ) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.weight_dtype = weight.dtype
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
            loss = _chunks(h, w, targets, chunk, ignore_index, grad_h, grad_w, compiled)
        # Kept on ctx, not saved for backward: no-grad results, scaled in place in backward.
        ctx.grads = (grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy: backward through the same loss twice is not supported")
        grad_h, grad_w = ctx.grads
        ctx.grads = None  # the gradients move to the caller; the 4 bytes x V x d of grad_w are not kept twice
        grad_h = None if grad_h is None else grad_h.mul_(grad_out)
        grad_w = None if grad_w is None else grad_w.mul_(grad_out).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk: int | None = None,
    ignore_index: int = -100,
    compile: bool = False,
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight).float(), targets)`` (mean), chunk by chunk (module docstring).

    ``hidden``: ``(..., d)`` final hidden states; ``weight``: ``(V, d)`` output matrix (a tied
    embedding works: its gradient is added to the embedding's); ``targets``: ``(...)`` token ids,
    ``ignore_index`` where no loss is taken. ``chunk``: tokens per chunk (``default_chunk(V)``).
    Differentiable in ``hidden`` and ``weight``; the loss of a batch with no target is 0.
    ``compile``: run each chunk's softmax and gradient as one ``torch.compile``d kernel
    (:func:`chunk_loss_and_grad`) instead of eager in-place passes; ``next_token_loss`` asks for it
    when the model it is handed is compiled (``fit`` compiles on CUDA by default).
    """
    if weight.ndim != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ShapeError(
            f"linear_cross_entropy: expected hidden (..., d) and weight (V, d), got {tuple(hidden.shape)} "
            f"and {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:-1] or targets.dtype.is_floating_point:
        raise ShapeError(
            f"linear_cross_entropy: expected integer targets of shape {tuple(hidden.shape[:-1])}, "
            f"got {tuple(targets.shape)} {targets.dtype}"
        )
    chunk = default_chunk(weight.shape[0]) if chunk is None else chunk
    if chunk < 1:
        raise ShapeError(f"linear_cross_entropy: expected chunk >= 1, got {chunk}")
    dtype = _matmul_dtype(hidden, weight)
    h, y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad):
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            return _chunks(h.to(dtype), weight.to(dtype), y, chunk, ignore_index, None, None, False)
    return _LinearCrossEntropy.apply(h, weight, y, chunk, ignore_index, dtype, compile)
