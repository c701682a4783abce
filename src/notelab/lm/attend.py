"""Attention of one new token a row over the engine's static cache, RoPE of the queries included, in one Triton
kernel.

In the batched decode step (``notelab.lm.engine``), after ``[q; k; v] = W_qkv RMSNorm(x)`` and the new keys and
values written into the cache at each row's slot ``p_b``, the torch step spends six kernels a layer on RoPE of
q, a memset, two batched products and a softmax (benchmarks/RESULTS.md, 2026-11-30 profile). Here one program a
(KV head g, row b) does all of it for the ``G = Hq / Hkv`` query heads that read head g:

    q_h <- RoPE(q_h, p_b)        (as ``notelab.core.rope.apply_rope``: x cos + rotate_half(x) sin, rounded to q's dtype)
    s_hj = q_h . k_gj / sqrt(D)   for the keys j = 0..p_b of the row (float32, no mask: only those are read)
    y_h  = sum_j softmax_j(s_h)_j v_gj                                  (online softmax over blocks of keys)

(Vaswani et al. 2017, eq. 1; the online softmax is Milakov & Gimelshein 2018), written in the layout ``o_proj``
reads. Scores and sums are float32 and rounded once at the end. Without a GPU the kernel runs through Triton's
interpreter (``TRITON_INTERPRET=1``, read by ``notelab.lm.chain``), which is how the tests check it on CPU.
"""

from __future__ import annotations

import torch

from notelab.lm.chain import _INTERPRET, _pow2, _rope_pair, tl, triton

BLOCK_KEYS = 32  # keys a program reads at once


def attend_unsupported(q: torch.Tensor, head_dim: int) -> str:
    """Why :func:`rope_attention` cannot run here ("" when it can)."""
    if triton is None:
        return "triton is not installed"
    if not (q.is_cuda or _INTERPRET):
        return "the model is not on a CUDA device (and TRITON_INTERPRET is not set)"
    if head_dim < 2 or head_dim & (head_dim - 1):
        return f"head_dim must be a power of two, got {head_dim}"
    return ""


if triton is not None:

    @triton.jit
    def _rope_attention_kernel(  # noqa: ANN202
        q_ptr,  # noqa: ANN001  (B, Hq, 1, D) queries before RoPE, any row / head strides, unit feature stride
        sqb,  # noqa: ANN001
        sqh,  # noqa: ANN001
        k_ptr,  # noqa: ANN001  (B, Hkv, S, D) cache, contiguous, the new keys already written
        v_ptr,  # noqa: ANN001
        cos_ptr,  # noqa: ANN001  (B, D) float32 cos(p_b theta) (halves repeated, as rope_cos_sin gives them)
        sin_ptr,  # noqa: ANN001
        pos_ptr,  # noqa: ANN001  (B,) int64 slots
        y_ptr,  # noqa: ANN001  (B, Hq D) out, q's dtype
        S,  # noqa: ANN001
        scale,  # noqa: ANN001
        HD: tl.constexpr,
        G: tl.constexpr,
        GP: tl.constexpr,  # G rounded up to a power of two
        BLOCK_S: tl.constexpr,
        ROPE: tl.constexpr,
    ):
        HALF: tl.constexpr = HD // 2
        g, b = tl.program_id(0), tl.program_id(1)
        nkv = tl.num_programs(0)
        dt = y_ptr.dtype.element_ty
        i = tl.arange(0, GP)
        j = tl.arange(0, HALF)
        in_group = i < G
        heads = g * G + i
        qrow = q_ptr + b.to(tl.int64) * sqb + heads[:, None] * sqh
        a1 = tl.load(qrow + j[None, :], mask=in_group[:, None], other=0.0).to(tl.float32)
        a2 = tl.load(qrow + HALF + j[None, :], mask=in_group[:, None], other=0.0).to(tl.float32)
        if ROPE:
            c = tl.load(cos_ptr + b * HD + j)[None, :]
            s = tl.load(sin_ptr + b * HD + j)[None, :]
            q1, q2 = _rope_pair(a1, a2, c, s, in_group[:, None], dt)
            a1, a2 = q1.to(tl.float32), q2.to(tl.float32)
        n = tl.load(pos_ptr + b).to(tl.int32) + 1  # keys 0..p_b
        base = (b.to(tl.int64) * nkv + g) * S * HD
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc1 = tl.zeros([GP, HALF], tl.float32)
        acc2 = tl.zeros([GP, HALF], tl.float32)
        for start in range(0, n, BLOCK_S):
            keys = start + tl.arange(0, BLOCK_S)
            live = keys < n
            offs = base + keys.to(tl.int64)[:, None] * HD + j[None, :]
            k1 = tl.load(k_ptr + offs, mask=live[:, None], other=0.0).to(tl.float32)
            k2 = tl.load(k_ptr + offs + HALF, mask=live[:, None], other=0.0).to(tl.float32)
            v1 = tl.load(v_ptr + offs, mask=live[:, None], other=0.0).to(tl.float32)
            v2 = tl.load(v_ptr + offs + HALF, mask=live[:, None], other=0.0).to(tl.float32)
            sc = tl.sum(a1[:, None, :] * k1[None, :, :], axis=2) + tl.sum(a2[:, None, :] * k2[None, :, :], axis=2)
            # scale: a Python float, float64 when inductor launches the kernel: the scores stay float32
            sc = tl.where(live[None, :], (sc * scale).to(tl.float32), float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc1 = acc1 * alpha[:, None] + tl.sum(p[:, :, None] * v1[None, :, :], axis=1)
            acc2 = acc2 * alpha[:, None] + tl.sum(p[:, :, None] * v2[None, :, :], axis=1)
            m_i = m_new
        yrow = y_ptr + b.to(tl.int64) * (nkv * G * HD) + heads[:, None] * HD
        tl.store(yrow + j[None, :], (acc1 / l_i[:, None]).to(dt), mask=in_group[:, None])
        tl.store(yrow + HALF + j[None, :], (acc2 / l_i[:, None]).to(dt), mask=in_group[:, None])

    @torch.library.triton_op("notelab::rope_attention", mutates_args=())
    def _rope_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        pos: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        rope: bool,
        block: int,
    ) -> torch.Tensor:
        """:func:`rope_attention` as an operator inductor compiles into its graph (the kernel launched as is)."""
        B, nq, _, hd = q.shape
        nkv, S = k.shape[1], k.shape[2]
        y = torch.empty(B, nq * hd, dtype=q.dtype, device=q.device)
        torch.library.wrap_triton(_rope_attention_kernel)[(nkv, B)](
            q, q.stride(0), q.stride(1), k, v, cos, sin, pos, y, S, hd**-0.5,
            HD=hd, G=nq // nkv, GP=_pow2(nq // nkv), BLOCK_S=block, ROPE=rope, num_warps=4,
        )  # fmt: skip
        return y


def rope_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    block: int = BLOCK_KEYS,
) -> torch.Tensor:
    """Attention of ``q`` ``(B, Hq, 1, D)`` (before RoPE) over the cache ``k``, ``v`` ``(B, Hkv, S, D)``, row ``b``
    reading keys ``0..pos[b]``, RoPE of q by ``rope`` = (cos, sin) ``(B, 1, 1, D)`` tables of the rows' slots
    (None: no rotation); returns ``(B, Hq, 1, D)``, as the engine's torch attention (``rotated_attention``)
    does. The engine's attention on CUDA (``Engine(attention=...)``); see :func:`attend_unsupported`."""
    B, nq, _, hd = q.shape
    why = attend_unsupported(q, hd)
    if why:
        raise RuntimeError(f"rope_attention: {why}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if rope is None:
        cos = sin = torch.empty(0, dtype=torch.float32, device=q.device)
    else:
        cos, sin = (t.reshape(B, hd).float().contiguous() for t in rope)
    y = torch.ops.notelab.rope_attention(q, k.contiguous(), v.contiguous(), pos, cos, sin, rope is not None, block)
    return y.view(B, nq, 1, hd)
