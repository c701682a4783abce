"""Attention of one new token a row over the engine's static cache, RoPE of the queries included, in two Triton
kernels.

In the batched decode step (``notelab.lm.engine``), after ``[q; k; v] = W_qkv RMSNorm(x)`` and the new keys and
values written into the cache at each row's slot ``p_b``, the torch step spends six kernels a layer on RoPE of
q, a memset, two batched products and a softmax (benchmarks/RESULTS.md, 2026-11-30 profile). Here, for the
``G = Hq / Hkv`` query heads h that read KV head g, with p_b the row's slot:

    q_h <- RoPE(q_h, p_b)      x cos + rotate_half(x) sin, rounded as ``notelab.core.rope.apply_rope`` rounds
    split kernel, a program per (block s of BLOCK_S keys, KV head g, row b), blocks past p_b idle:
        s_hj = q_h . k_gj / sqrt(D) over the block's keys j <= p_b (float32);  m_s = max_j s_hj,
        l_s = sum_j e^(s_hj - m_s),  o_s = sum_j e^(s_hj - m_s) v_gj        (products on tensor cores, the
        group's heads padded to 16 rows; the weights rounded to the cache's dtype, as the torch step rounds)
    combine kernel, a program per (g, b):  y_h = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s,  M = max_s m_s

(Vaswani et al. 2017, eq. 1; the split over keys and its combination are flash-decoding: Dao, Haziza, Massa &
Sizov, 2023), y written where ``o_proj`` reads it. Every program reads one block of keys at once, rather than a
few programs walking the whole cache. Without a GPU the kernels run through Triton's interpreter
(``TRITON_INTERPRET=1``, read by ``notelab.lm.triton_env``), which is how the tests check them on CPU.
"""

from __future__ import annotations

import torch

from notelab.core.attention import KVCache
from notelab.lm.triton_env import INTERPRET as _INTERPRET
from notelab.lm.triton_env import PDL_MAX_ROWS, kernels_unsupported, launch_options, pdl_usable, tl, triton
from notelab.lm.triton_env import pow2 as _pow2

# keys a program reads (one block: the keys of a row are split over programs). 64 against 32: +0.7-0.9 points of
# the roofline at 32 rows, equal at 8 (benchmarks/RESULTS.md, eleventh session)
BLOCK_KEYS = 64


def attend_unsupported(q: torch.Tensor, head_dim: int) -> str:
    """Why :func:`rope_attention` cannot run here ("" when it can)."""
    why = kernels_unsupported(q)
    if why:
        return why
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"head_dim must be a power of two >= 16, got {head_dim}"
    return ""


if triton is not None:
    from notelab.lm.triton_env import dependent_launch

    @triton.jit
    def _rope_rows(xa, x_ptrs_b, mask, d, c, sn, r, HALF: tl.constexpr, HD: tl.constexpr, dt: tl.constexpr):  # noqa: ANN001, ANN202
        """Rows ``xa`` (loaded at ``d``) times ``r`` (rounded to ``dt``), rotated: x cos + rotate_half(x) sin,
        rotate_half(x) = [-x2, x1], rounded as ``notelab.core.rope.apply_rope`` rounds in ``dt``; ``x_ptrs_b`` the
        rows' pointers (for x2 / x1)."""
        xb = tl.load(x_ptrs_b + ((d + HALF) % HD)[None, :], mask=mask, other=0.0)
        xb = (xb.to(tl.float32) * r).to(dt).to(tl.float32)
        sign = tl.where(d < HALF, -1.0, 1.0)[None, :]
        xc = ((xa.to(tl.float32) * r).to(dt).to(tl.float32) * c).to(dt).to(tl.float32)
        return (xc + (sign * xb * sn).to(dt).to(tl.float32)).to(dt)

    @triton.jit
    def _split_kernel(  # noqa: ANN202
        q_ptr, sqb, sqh, kn_ptr, skb, skh, vn_ptr, svb, svh, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr,  # noqa: ANN001
        part_ptr, ml_ptr, x_ptr, sxb, D, eps, S, scale,  # noqa: ANN001
        HD: tl.constexpr, G: tl.constexpr, GQ: tl.constexpr, GP: tl.constexpr, NSPLIT: tl.constexpr,
        NSP2: tl.constexpr, BLOCK_S: tl.constexpr, ROPE: tl.constexpr, IEEE: tl.constexpr, NORM: tl.constexpr,
        DP2: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """Program (split s, KV head g, row b): the G query heads of g over keys [s BLOCK_S, (s + 1) BLOCK_S) of
        the row's 0..p_b; its partial (max m, sum l of e^(score - m), sum of e^(score - m) v) per head. The program
        whose block holds p_b rotates the new key, writes the new key and value into the cache at p_b and uses
        them there (no other program reads slot p_b). ``NORM``: q, k, v are projections of the un-normalised
        residual row ``x_b`` (the RMSNorm's gain folded into the weights): times r_b = 1 / sqrt(mean(x_b^2) + eps)
        first (``notelab.lm.folded``)."""
        dependent_launch(PDL)
        s, g, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n = tl.load(pos_ptr + b).to(tl.int32) + 1  # keys 0..p_b
        start = s * BLOCK_S
        if start < n:
            nkv = tl.num_programs(1)
            dt = k_ptr.dtype.element_ty
            HALF: tl.constexpr = HD // 2
            i = tl.arange(0, GP)
            d = tl.arange(0, HD)
            in_group = i < G
            r = 1.0
            if NORM:
                dm = tl.arange(0, DP2)
                xr = tl.load(x_ptr + b.to(tl.int64) * sxb + dm, mask=dm < D, other=0.0).to(tl.float32)
                r = tl.math.rsqrt(tl.sum(xr * xr, 0) / D + eps)
            if ROPE:
                c = tl.load(cos_ptr + b * HD + d).to(dt).to(tl.float32)[None, :]
                sn = tl.load(sin_ptr + b * HD + d).to(dt).to(tl.float32)[None, :]
            qrow = q_ptr + b.to(tl.int64) * sqb + (g * G + i)[:, None] * sqh
            qa = tl.load(qrow + d[None, :], mask=in_group[:, None], other=0.0)
            if ROPE:
                q = _rope_rows(qa, qrow, in_group[:, None], d, c, sn, r, HALF, HD, dt)
            else:
                q = (qa.to(tl.float32) * r).to(dt)
            keys = start + tl.arange(0, BLOCK_S)
            live = keys < n
            base = (b.to(tl.int64) * nkv + g) * S * HD
            kt = tl.load(k_ptr + base + keys[None, :] * HD + d[:, None], mask=live[None, :], other=0.0)  # (HD, BS)
            vv = tl.load(v_ptr + base + keys[:, None] * HD + d[None, :], mask=live[:, None], other=0.0)  # (BS, HD)
            slot = n - 1
            if slot < start + BLOCK_S:  # this block holds the new token's slot
                krow = kn_ptr + b.to(tl.int64) * skb + g * skh + tl.zeros([1], tl.int32)[:, None]
                ka = tl.load(krow + d[None, :])
                if ROPE:
                    kn = _rope_rows(ka, krow, d[None, :] < HD, d, c, sn, r, HALF, HD, dt)  # (1, HD)
                else:
                    kn = (ka.to(tl.float32) * r).to(dt)
                vn = (tl.load(vn_ptr + b.to(tl.int64) * svb + g * svh + d).to(tl.float32) * r).to(dt)
                tl.store(k_ptr + base + slot * HD + d[None, :], kn)
                tl.store(v_ptr + base + slot * HD + d, vn)
                at = keys == slot
                kt = tl.where(at[None, :], tl.trans(kn), kt)
                vv = tl.where(at[:, None], vn[None, :], vv)
            if IEEE:  # float32 operands (exact for bf16 ones): float32 models, and the interpreter (no bf16 dot)
                sc = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
            else:
                sc = tl.dot(q, kt)
            # scale: a Python float, float64 when inductor launches the kernel: the scores stay float32
            sc = tl.where(live[None, :], (sc * scale).to(tl.float32), float("-inf"))
            m = tl.max(sc, axis=1)
            p = tl.exp(sc - m[:, None])
            if IEEE:
                acc = tl.dot(p.to(dt).to(tl.float32), vv.to(tl.float32), input_precision="ieee")
            else:
                acc = tl.dot(p.to(dt), vv)
            cell = ((b * nkv + g) * NSPLIT + s) * GQ + i  # rows i < GQ are kept: G rounded up to a power of two
            kept = i < GQ
            tl.store(part_ptr + cell[:, None] * HD + d[None, :], acc, mask=kept[:, None])
            tl.store(ml_ptr + cell * 2, m, mask=kept)
            tl.store(ml_ptr + cell * 2 + 1, tl.sum(p, axis=1), mask=kept)

    @triton.jit
    def _combine_kernel(  # noqa: ANN202
        pos_ptr, part_ptr, ml_ptr, y_ptr,  # noqa: ANN001
        HD: tl.constexpr, G: tl.constexpr, GQ: tl.constexpr, NSPLIT: tl.constexpr, NSP2: tl.constexpr,
        BLOCK_S: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """Program (KV head g, row b): y_h = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s over the row's splits,
        M = max_s m_s (flash-decoding's combination), written where o_proj reads head h."""
        dependent_launch(PDL)
        g, b = tl.program_id(0), tl.program_id(1)
        nkv = tl.num_programs(0)
        n = tl.load(pos_ptr + b).to(tl.int32) + 1
        sp = tl.arange(0, NSP2)
        used = sp * BLOCK_S < n  # the splits that held keys of this row
        i = tl.arange(0, GQ)
        d = tl.arange(0, HD)
        cells = ((b * nkv + g) * NSPLIT + sp)[:, None] * GQ + i[None, :]  # (NSP2, GQ)
        ms = tl.load(ml_ptr + cells * 2, mask=used[:, None], other=float("-inf"))
        ls = tl.load(ml_ptr + cells * 2 + 1, mask=used[:, None], other=0.0)
        parts = tl.load(part_ptr + cells[:, :, None] * HD + d[None, None, :], mask=used[:, None, None], other=0.0)
        top = tl.max(ms, axis=0)  # split 0 always holds key 0: finite
        w = tl.where(used[:, None], tl.exp(ms - top[None, :]), 0.0)
        y = tl.sum(w[:, :, None] * parts, axis=0) / tl.sum(w * ls, axis=0)[:, None]  # (GQ, HD)
        yrow = y_ptr + b.to(tl.int64) * (nkv * G * HD) + (g * G + i)[:, None] * HD + d[None, :]
        tl.store(yrow, y.to(y_ptr.dtype.element_ty), mask=(i < G)[:, None])

    def _attend(
        q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, x: torch.Tensor, eps: float, rope: bool, norm: bool,
        block: int, pdl: bool,
    ) -> torch.Tensor:  # fmt: skip
        B, nq, _, hd = q.shape
        nkv, S = k.shape[1], k.shape[2]
        G = nq // nkv
        pdl = pdl_usable(pdl, q)
        gq, nsplit = _pow2(G), -(-S // block)
        f32 = dict(dtype=torch.float32, device=q.device)
        part = torch.empty(B * nkv * nsplit * gq * hd, **f32)
        ml = torch.empty(B * nkv * nsplit * gq * 2, **f32)
        y = torch.empty(B, nq * hd, dtype=q.dtype, device=q.device)
        sizes = dict(HD=hd, G=G, GQ=gq, NSPLIT=nsplit, NSP2=_pow2(nsplit), BLOCK_S=block)
        launch = launch_options(pdl)
        _split_kernel[(nsplit, nkv, B)](
            q, q.stride(0), q.stride(1), k_new, k_new.stride(0), k_new.stride(1), v_new, v_new.stride(0),
            v_new.stride(1), k, v, cos, sin, pos, part, ml, x, x.stride(0), x.shape[-1], eps, S, hd**-0.5,
            GP=max(16, gq), ROPE=rope, IEEE=k.dtype == torch.float32 or _INTERPRET, NORM=norm,
            DP2=max(2, _pow2(x.shape[-1])), **sizes, **launch,
        )  # fmt: skip
        _combine_kernel[(nkv, B)](pos, part, ml, y, **sizes, **launch)
        return y

    @torch.library.custom_op("notelab::rope_attention", mutates_args=("k", "v"))
    def _rope_attention(
        q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, x: torch.Tensor, eps: float, rope: bool, norm: bool,
        block: int, pdl: bool,
    ) -> torch.Tensor:  # fmt: skip
        """:func:`rope_attention` as an opaque operator: a compiled graph calls it as it is and its kernels launch
        themselves, with programmatic dependent launch if ``pdl`` (an option inductor does not pass on to the
        kernels of a ``triton_op``, which also needed a kernel a layer preparing their inputs: measured slower at 8
        and 32 rows, benchmarks/RESULTS.md)."""
        return _attend(q, k_new, v_new, k, v, pos, cos, sin, x, eps, rope, norm, block, pdl)

    @_rope_attention.register_fake
    def _(q, k_new, v_new, k, v, pos, cos, sin, x, eps, rope, norm, block, pdl):  # noqa: ANN001, ANN202
        return q.new_empty(q.shape[0], q.shape[1] * q.shape[3])


def rope_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: KVCache,
    pos: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    block: int = BLOCK_KEYS,
    norm: tuple[torch.Tensor, float] | None = None,
    pdl: bool | None = None,
) -> torch.Tensor:
    """Attention of the new token of each row: ``q`` ``(B, Hq, 1, D)``, ``k``, ``v`` ``(B, Hkv, 1, D)`` before RoPE,
    rotated by ``rope`` = (cos, sin) ``(B, 1, 1, D)`` tables of the rows' slots ``pos`` (None: no rotation); the
    new key and value written into ``cache`` (``KVCache``, ``(B, Hkv, S, D)``) at ``pos[b]``, row ``b`` reading
    keys ``0..pos[b]``; returns ``(B, Hq, 1, D)``, as the engine's torch attention (``rotated_attention``) does.
    ``norm`` = (x ``(B, dim)``, eps): q, k, v are projections of the residual rows x before their RMSNorm, its gain
    folded into the weights (``notelab.lm.folded``): scaled by 1 / sqrt(mean(x^2) + eps) first (None: as given).
    ``block``: keys a program reads (at least 16). ``pdl``: the kernels launch with programmatic dependent launch
    (sm_90+: each may start before the kernel ahead of it ends and waits for it before reading anything); None: at
    up to ``notelab.lm.triton_env.PDL_MAX_ROWS`` rows (measured faster there, slower at 32). The engine's attention
    on CUDA (``Engine(attention=...)``); see :func:`attend_unsupported`."""
    B, nq, _, hd = q.shape
    why = attend_unsupported(q, hd)
    if why:
        raise RuntimeError(f"rope_attention: {why}")
    dt = cache.k.dtype
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q.to(dt), k.to(dt), v.to(dt)))
    if rope is None:
        cos = sin = torch.empty(0, dtype=torch.float32, device=q.device)
    else:
        cos, sin = (t.reshape(B, hd).float().contiguous() for t in rope)
    if norm is None:
        x, eps = torch.empty(1, 1, dtype=dt, device=q.device), 0.0
    else:
        x, eps = norm[0].reshape(B, -1), norm[1]
        x = x if x.stride(-1) == 1 else x.contiguous()
    pdl = B <= PDL_MAX_ROWS if pdl is None else pdl
    args = (q, k, v, cache.k, cache.v, pos, cos, sin, x, float(eps), rope is not None, norm is not None, max(16, block))
    return torch.ops.notelab.rope_attention(*args, pdl).view(B, nq, 1, hd)
