"""Scaled dot-product attention with masks, grouped-query heads and a static KV cache.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k) + M) V        (Vaswani et al. 2017, eq. 1)

``M`` is 0 where a query may look and -inf elsewhere. Every model in notelab calls
:func:`attention`, which runs on ``F.scaled_dot_product_attention`` (flash / memory-efficient
kernels on GPU).

Grouped-query attention (Ainslie et al. 2023): ``Hq`` query heads share ``Hkv`` key/value heads,
``Hq % Hkv == 0``; query head ``h`` reads kv head ``h // (Hq // Hkv)``::

    q heads:  0 1 | 2 3 | 4 5 | 6 7      (Hq = 8)
    kv heads:  0  |  1  |  2  |  3       (Hkv = 4, group size 2)

Masks are boolean, ``True`` where attention is allowed, broadcastable to ``(B, H, Tq, Tk)``.
With a cache the ``Tq`` new queries are the *last* ``Tq`` positions of the ``Tk`` keys, so the
causal mask is aligned bottom-right: query ``i`` sees keys ``j <= i + (Tk - Tq)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from notelab.core.errors import ShapeError


def causal_mask(tq: int, tk: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Bool ``(Tq, Tk)``: query ``i`` (the ``i``-th of the last ``Tq`` positions) sees keys ``j <= i + Tk - Tq``."""
    i = torch.arange(tq, device=device)[:, None]
    j = torch.arange(tk, device=device)[None, :]
    return j <= i + (tk - tq)


def padding_mask(key_is_pad: torch.Tensor) -> torch.Tensor:
    """``(B, Tk)`` bool, True at padding keys -> ``(B, 1, 1, Tk)`` mask that hides them."""
    return ~key_is_pad[:, None, None, :]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Multi-head attention ``(B, Hq, Tq, D) x (B, Hkv, Tk, D) -> (B, Hq, Tq, D)``.

    ``mask``: bool, True = attend, broadcastable to ``(B, Hq, Tq, Tk)``. ``is_causal`` adds the
    bottom-right aligned causal mask (see module docstring). A query row with every key masked
    returns zeros rather than NaN.
    """
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape or q.shape[-1] != k.shape[-1] or q.shape[0] != k.shape[0]:
        raise ShapeError(
            f"attention: expected q (B, Hq, Tq, D) and k, v (B, Hkv, Tk, D), got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    hq, hkv = q.shape[1], k.shape[1]
    if hq % hkv:
        raise ShapeError(f"attention: query heads {hq} must be a multiple of key/value heads {hkv}")
    tq, tk = q.shape[2], k.shape[2]
    if is_causal and mask is None and tq == tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, enable_gqa=hq != hkv)
    if is_causal:
        cm = causal_mask(tq, tk, q.device)
        mask = cm if mask is None else mask & cm
    if hq != hkv and mask is not None and (mask.ndim < 3 or mask.shape[-3] == 1):
        out = _grouped_masked(q, k, v, mask, dropout_p)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=hq != hkv)
    if mask is not None:
        # SDPA gives NaN for a row with no visible key (e.g. a padded query); such rows carry no information.
        out = out.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    return out


def _grouped_masked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, dropout_p: float
) -> torch.Tensor:
    """GQA with a head-independent mask, without copying keys/values.

    SDPA's fused kernels take either a mask or grouped heads, not both; the fallback repeats
    k/v for every query head (a copy of the whole KV cache per decode step). Instead the ``G``
    query heads of a group are folded into the query-length axis, ``(B, Hkv, G*Tq, D)``, which
    attend to their shared kv head with the mask repeated ``G`` times.
    """
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g = hq // hkv
    m = mask.reshape(*(1,) * (4 - mask.ndim), *mask.shape).expand(-1, 1, tq, tk)
    m = m.unsqueeze(2).expand(-1, 1, g, tq, tk).reshape(m.shape[0], 1, g * tq, tk)
    out = F.scaled_dot_product_attention(q.reshape(b, hkv, g * tq, d), k, v, attn_mask=m, dropout_p=dropout_p)
    return out.reshape(b, hq, tq, d)


class KVCache(nn.Module):
    """A preallocated key/value cache ``(B, Hkv, max_len, D)`` for autoregressive decoding.

    Static shapes (the buffers never grow) let a compiled decode step be reused for every token.
    ``update`` writes new keys/values at positions ``start .. start+T-1`` and returns the filled
    prefix; ``write`` writes at arbitrary positions and returns the whole buffers, for a decode step
    that masks unused slots itself and so keeps every shape constant.
    """

    def __init__(
        self,
        batch: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v`` of shape ``(B, Hkv, T, D)`` at ``start``; return keys/values ``[0, start+T)``."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ShapeError(f"KVCache: positions up to {end} requested, cache holds {self.max_len}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def write(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v`` ``(B, Hkv, T, D)`` at ``positions`` ``(T,)`` (or ``(B, T)``: each row its own);
        return the full buffers."""
        if positions.ndim == 1:
            self.k.index_copy_(2, positions, k)
            self.v.index_copy_(2, positions, v)
            return self.k, self.v
        rows = torch.arange(k.shape[0], device=k.device)[:, None]  # (B, 1) against positions (B, T)
        self.k[rows, :, positions] = k.transpose(1, 2).to(self.k.dtype)  # indexed view: (B, T, Hkv, D)
        self.v[rows, :, positions] = v.transpose(1, 2).to(self.v.dtype)
        return self.k, self.v

    def copy_rows(self, rows: torch.Tensor, other: KVCache) -> None:
        """Copy ``other``'s entries ``(n, Hkv, T, D)`` into rows ``rows`` ``(n,)``, slots ``[0, T)``, of this cache."""
        t = other.max_len
        self.k[:, :, :t].index_copy_(0, rows, other.k.to(self.k.dtype))
        self.v[:, :, :t].index_copy_(0, rows, other.v.to(self.v.dtype))
