"""Batch-1 greedy decoding as one chain of Triton kernels with programmatic dependent launch.

One token of a Llama (RMSNorm, SwiGLU, RoPE, grouped-query attention; batch 1, no padding), with x the
residual stream, p the cache slot (= the position) and K, V the layer's cache:

    x = E[tok]                                                                   _embed_kernel
    for each layer:
        [q; k; v] = W_qkv RMSNorm(x);  q, k <- RoPE(q, p), RoPE(k, p);  K[p], V[p] <- k, v        _qkv_rope_kernel
        y  = softmax(q K[0..p]^T / sqrt(D)) V[0..p]       one program per query head, online softmax over
             blocks of keys; past ``split_keys`` keys, flash-decoding: S splits, each a partial
             (max m_s, sum l_s, o_s), combined by the split that finishes last:
             y = sum_s e^(m_s - m) o_s / sum_s e^(m_s - m) l_s,  m = max_s m_s    _attention_kernel
        x2 = x + W_o y                                                           _matvec_kernel
        a  = SiLU(W_gate h) * (W_up h),  h = RMSNorm(x2)                         _matvec_kernel (SWIGLU)
        x  = x2 + W_down a                                                       _matvec_kernel
    tok = argmax W_out RMSNorm(x)    (first index of the maximum, by a 64-bit atomic max of
                                      (value, -index) keys; the last program writes tok, out[p + 1], p + 1)
                                                                                 _lm_head_kernel

2 + 5 * n_layers kernels a token, every rounding where the torch step rounds (bf16 products, norms, RoPE,
SiLU product, residual adds), float32 accumulation; attention is computed in float32 and rounded once.
The online softmax is Milakov & Gimelshein (2018, "Online normalizer calculation for softmax"); the
split over keys is flash-decoding (Dao, Haziza, Massa & Sizov, 2023); the model is ``notelab.lm.model``.

Why: at batch 1 every weight byte is read once per token, so the step is bound by memory bandwidth, but
a 1B model's projections are small (8-67 MB, 2-16 us each at 4.3 TB/s), and between two kernels the GPU
drains the first, launches the second and ramps it up: microseconds in which no weight is read. With
programmatic dependent launch (PDL, Hopper and later: ``griddepcontrol``; Triton's
``tl.extra.cuda.gdc_wait`` / ``gdc_launch_dependents`` and ``launch_pdl=True``) a kernel may start
while the previous one is still running. Each kernel here therefore issues the loads of its weight
tile first (weights do not depend on the previous kernel), then waits for the previous kernel
(``gdc_wait``: its writes are visible after it), then lets the next kernel launch and computes. The
weight stream of kernel i + 1 overlaps the tail of kernel i. Every kernel of the chain must take part:
a kernel launched without PDL is a full barrier again, which is why the whole step (embedding,
attention, argmax) is written here rather than only the products. The dependency rule is simple:
before ``gdc_wait`` a program reads nothing but weights and writes nothing; after it, everything
earlier in the stream has completed (each kernel waited for its predecessor before finishing).

Each product program holds a whole-row weight tile (rows x K, 16 KiB in bf16 by default) in registers,
so all its loads are in flight at once. RoPE pairs features (i, i + D/2) of a head, so a q/k/v program
owns pairs of rows; the SwiGLU program owns the rows i of W_gate and W_up of the stacked
``[W_gate; W_up]``. The cache slot changes only between steps, so programs read it (and the RoPE
tables) before their wait too.

Measured on an H200 (Llama-3.2-1B, bf16, benchmarks/RESULTS.md): 1,229-1,241 tokens/s through
``generate``, 71-72% of the HBM roofline (weight bytes / copy bandwidth); without PDL 1,138-1,147.

Without a GPU the same kernels run through Triton's interpreter (``TRITON_INTERPRET=1``, without PDL),
which is how the tests check them against the torch model on CPU.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from notelab.core.mlp import SwiGLU
from notelab.core.norms import RMSNorm
from notelab.core.rope import rope_cos_sin
from notelab.lm.model import FusedWeights, Llama
from notelab.lm.nucleus import draw_tokens, pivot_threshold
from notelab.lm.sampling import Sampler, choose_tokens
from notelab.lm.triton_env import INTERPRET as _INTERPRET
from notelab.lm.triton_env import launch_options, tl, triton
from notelab.lm.triton_env import pow2 as _pow2

RECOMPILE_LIMIT = 64  # compiled versions of the sampler kept (kinds of processing x cache lengths)


__all__ = ["ChainDecoder", "ChainOptions", "DecodeChain", "chain_unsupported"]


@dataclass(frozen=True)
class ChainOptions:
    """The chain's knobs (for benchmarks; the defaults are the measured choice).

    ``tile_elems``: weight elements a product program holds (rows x K, rounded to powers of two);
    ``warps``: warps per product program; ``lm_programs_per_sm``: programs of the output projection per SM,
    each looping over row tiles (few programs keep the argmax atomics few);
    ``attn_block``: keys per attention block; ``split_keys``: keys per attention program before the keys
    are split over more programs (flash-decoding), at most ``max_splits`` per query head;
    ``pdl``: launch with programmatic dependent launch (on GPUs that have it, compute capability >= 9.0);
    ``early_launch``: each kernel lets the next one launch as soon as it starts (before its own wait), so
    several kernels ahead can be loading weights, rather than after its wait.
    """

    tile_elems: int = 8192
    warps: int = 4
    lm_programs_per_sm: int = 4
    attn_block: int = 64
    split_keys: int = 512
    max_splits: int = 16
    pdl: bool = True
    early_launch: bool = True


OPTIONS = ChainOptions()  # what DecodeChain uses when given none (benchmarks set it to compare)


def chain_unsupported(model: Llama, batch: int, padded: bool, dtype: torch.dtype, fuse: bool = True) -> str:
    """Why the chain cannot run this step ("" when it can): the kernels cover batch-1 unpadded RoPE + RMSNorm +
    bias-free SwiGLU models with stacked weights (``fuse``), power-of-two head sizes, one dtype, on CUDA (or
    interpreted by Triton)."""
    c = model.config
    w = model.embed_tokens.weight
    if triton is None:
        return "triton is not installed"
    if model.unplain_reason():  # the kernels read the projection weights directly and would skip an adapter
        return model.unplain_reason()
    if not (_INTERPRET or w.is_cuda):
        return "the model is not on a CUDA device (and TRITON_INTERPRET is not set)"
    if batch != 1 or padded:
        return f"batch 1 without padding only, got batch {batch}{' (padded)' if padded else ''}"
    if model.embed_positions is not None or not isinstance(model.norm, RMSNorm):
        return "RoPE + RMSNorm models only"
    if not fuse:
        return "the chain multiplies by the stacked [q; k; v] and [gate; up] weights: fuse=True"
    for b in model.layers:
        if not (isinstance(b.input_layernorm, RMSNorm) and isinstance(b.post_attention_layernorm, RMSNorm)):
            return "RMSNorm blocks only"
        if not isinstance(b.mlp, SwiGLU) or b.mlp.gate_proj.bias is not None or b.mlp.up_proj.bias is not None:
            return "bias-free SwiGLU blocks only"
    if c.head_dim < 2 or c.head_dim & (c.head_dim - 1):
        return f"head_dim must be a power of two, got {c.head_dim}"
    if any(p.dtype != dtype for p in model.parameters()):
        return f"weights and cache must share one dtype ({dtype})"
    return ""


if triton is not None:

    @triton.jit
    def _rms_input(x_ptr, nw_ptr, eps, offs_k, mask_k, K: tl.constexpr, ROUND_NORM: tl.constexpr):  # noqa: ANN001, ANN202
        """RMSNorm(x) in float32, rounded where ``notelab.core.norms.rms_norm`` rounds in x's dtype."""
        dt = x_ptr.dtype.element_ty
        xv = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(xv * xv, axis=0) / K + eps)
        g = tl.load(nw_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        h = (xv * rstd).to(dt).to(tl.float32) * g
        if ROUND_NORM:
            h = h.to(dt).to(tl.float32)
        return h

    @triton.jit
    def _row_tile(w_ptr, rows, mask_r, offs_k, mask_k, K: tl.constexpr):  # noqa: ANN001, ANN202
        """The whole rows ``rows`` of a row-major (N, K) weight: read once per token, so not kept in cache."""
        ptrs = w_ptr + rows.to(tl.int64)[:, None] * K + offs_k[None, :]
        return tl.load(ptrs, mask=mask_r[:, None] & mask_k[None, :], other=0.0, eviction_policy="evict_first")

    @triton.jit
    def _launch_next(PDL: tl.constexpr, EARLY: tl.constexpr, AFTER_WAIT: tl.constexpr):  # noqa: ANN202
        """Let the next kernel of the stream launch: at the start (EARLY) or right after the wait."""
        if PDL and EARLY != AFTER_WAIT:
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _wait_previous(PDL: tl.constexpr):  # noqa: ANN202
        """Wait until the previous kernel of the stream has finished and its writes are visible."""
        if PDL:
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def _rope_pair(a1, a2, c, s, rot, dt: tl.constexpr):  # noqa: ANN001, ANN202
        """Features (j, j + D/2) of a head after RoPE where ``rot`` (q and k heads; v heads pass through), in
        ``dt``: as ``notelab.core.rope.apply_rope`` computes it in x's dtype, x * cos + rotate_half(x) * sin."""
        c = c.to(dt).to(tl.float32)
        s = s.to(dt).to(tl.float32)
        b1 = (a1 * c).to(dt).to(tl.float32) + (-a2 * s).to(dt).to(tl.float32)
        b2 = (a2 * c).to(dt).to(tl.float32) + (a1 * s).to(dt).to(tl.float32)
        return tl.where(rot, b1, a1).to(dt), tl.where(rot, b2, a2).to(dt)

    @triton.jit
    def _embed_kernel(tok_ptr, emb_ptr, x_ptr, D, BLOCK: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr):  # noqa: ANN001, ANN202
        _launch_next(PDL, EARLY, False)
        _wait_previous(PDL)
        _launch_next(PDL, EARLY, True)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tok = tl.load(tok_ptr).to(tl.int64)
        v = tl.load(emb_ptr + tok * D + offs, mask=offs < D)
        tl.store(x_ptr + offs, v, mask=offs < D)

    @triton.jit
    def _qkv_rope_kernel(  # noqa: ANN202
        x_ptr,  # noqa: ANN001  (K,) residual stream
        nw_ptr,  # noqa: ANN001  (K,) input_layernorm weight
        w_ptr,  # noqa: ANN001  ((NQ + 2 NKV) HD, K) stacked [W_q; W_k; W_v]
        cos_ptr,  # noqa: ANN001  (S, HD/2) float32 cos(p theta_i)
        sin_ptr,  # noqa: ANN001
        slot_ptr,  # noqa: ANN001  () int64 position = cache slot
        q_ptr,  # noqa: ANN001  (NQ HD,) out
        k_ptr,  # noqa: ANN001  (NKV, S, HD) cache
        v_ptr,  # noqa: ANN001
        eps,  # noqa: ANN001
        S,  # noqa: ANN001
        K: tl.constexpr,
        KP: tl.constexpr,
        HD: tl.constexpr,
        NQ: tl.constexpr,
        NKV: tl.constexpr,
        BLOCK_P: tl.constexpr,
        ROUND_NORM: tl.constexpr,
        PDL: tl.constexpr,
        EARLY: tl.constexpr,
    ):
        _launch_next(PDL, EARLY, False)
        HALF: tl.constexpr = HD // 2
        PER_HEAD: tl.constexpr = HALF // BLOCK_P
        pid = tl.program_id(0)
        head = pid // PER_HEAD
        j = (pid % PER_HEAD) * BLOCK_P + tl.arange(0, BLOCK_P)  # pair index in the head: features j, j + HALF
        r1 = head * HD + j
        offs_k = tl.arange(0, KP)
        mask_k = offs_k < K
        mask_r = j < HALF
        w1 = _row_tile(w_ptr, r1, mask_r, offs_k, mask_k, K)
        w2 = _row_tile(w_ptr, r1 + HALF, mask_r, offs_k, mask_k, K)
        # The slot changes only between steps (graph replays), never inside one: safe to read before the wait.
        slot = tl.load(slot_ptr).to(tl.int64)
        c = tl.load(cos_ptr + slot * HALF + j)
        s = tl.load(sin_ptr + slot * HALF + j)
        _wait_previous(PDL)
        h = _rms_input(x_ptr, nw_ptr, eps, offs_k, mask_k, K, ROUND_NORM)
        _launch_next(PDL, EARLY, True)
        dt = x_ptr.dtype.element_ty
        a1 = tl.sum(w1.to(tl.float32) * h[None, :], axis=1).to(dt).to(tl.float32)
        a2 = tl.sum(w2.to(tl.float32) * h[None, :], axis=1).to(dt).to(tl.float32)
        hv = head + 0 * j  # the head, as a tensor (for element masks)
        b1, b2 = _rope_pair(a1, a2, c, s, hv < NQ + NKV, dt)
        is_q = hv < NQ
        tl.store(q_ptr + head * HD + j, b1, mask=mask_r & is_q)
        tl.store(q_ptr + head * HD + HALF + j, b2, mask=mask_r & is_q)
        is_k = (hv >= NQ) & (hv < NQ + NKV)
        kv_head = tl.where(is_k, hv - NQ, hv - NQ - NKV).to(tl.int64)
        row = (kv_head * S + slot) * HD
        tl.store(k_ptr + row + j, b1, mask=mask_r & is_k)
        tl.store(k_ptr + row + HALF + j, b2, mask=mask_r & is_k)
        is_v = hv >= NQ + NKV
        tl.store(v_ptr + row + j, b1, mask=mask_r & is_v)
        tl.store(v_ptr + row + HALF + j, b2, mask=mask_r & is_v)

    @triton.jit
    def _attention_kernel(  # noqa: ANN202
        q_ptr,  # noqa: ANN001  (B, NQ HD) rotated queries
        k_ptr,  # noqa: ANN001  (B, NKV, S, HD) cache
        v_ptr,  # noqa: ANN001
        slot_ptr,  # noqa: ANN001  (B,) int64, each row's slot (0-d at batch 1)
        part_ptr,  # noqa: ANN001  (B, NQ, NSPLIT, HD) float32 partial outputs (NSPLIT > 1)
        m_ptr,  # noqa: ANN001  (B, NQ, NSPLIT) float32 partial maxima
        l_ptr,  # noqa: ANN001  (B, NQ, NSPLIT) float32 partial sums
        count_ptr,  # noqa: ANN001  (B, NQ) int32 finished splits, zero between steps
        y_ptr,  # noqa: ANN001  (B, NQ HD) out, q's dtype
        S,  # noqa: ANN001
        scale,  # noqa: ANN001
        HD: tl.constexpr,
        G: tl.constexpr,  # query heads per KV head
        NSPLIT: tl.constexpr,
        BLOCK_S: tl.constexpr,
        PDL: tl.constexpr,
        EARLY: tl.constexpr,
    ):
        _launch_next(PDL, EARLY, False)
        head = tl.program_id(0)
        sp = tl.program_id(1)
        row = tl.program_id(2)  # the batch row (0 at batch 1)
        nq = tl.num_programs(0)
        head = row * nq + head  # the row's head, as an index into (B, NQ) arrays
        # The slot changes only between steps (graph replays), never inside one: safe to read before the wait.
        n = tl.load(slot_ptr + row).to(tl.int32) + 1  # keys 0..slot
        chunk = tl.cdiv(n, NSPLIT)
        lo = sp * chunk
        hi = tl.minimum(lo + chunk, n)
        d = tl.arange(0, HD)
        base = (head // G).to(tl.int64) * S * HD  # (row, kv head) = (row NQ + h) // G: G divides NQ
        _wait_previous(PDL)
        _launch_next(PDL, EARLY, True)
        q = tl.load(q_ptr + head * HD + d).to(tl.float32)
        m_i = tl.max(tl.full([BLOCK_S], float("-inf"), tl.float32), axis=0)
        l_i = tl.sum(tl.zeros([BLOCK_S], tl.float32), axis=0)
        acc = tl.zeros([HD], tl.float32)
        for start in range(lo, hi, BLOCK_S):
            keys = start + tl.arange(0, BLOCK_S)
            mask_s = keys < hi
            offs = base + keys.to(tl.int64)[:, None] * HD + d[None, :]
            kt = tl.load(k_ptr + offs, mask=mask_s[:, None], other=0.0).to(tl.float32)
            vt = tl.load(v_ptr + offs, mask=mask_s[:, None], other=0.0).to(tl.float32)
            # scale: a Python float, float64 when inductor launches the kernel: the scores stay float32
            sc = tl.where(mask_s, (tl.sum(kt * q[None, :], axis=1) * scale).to(tl.float32), float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=0))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(sc - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * vt, axis=0)
            m_i = m_new
        y_dt = y_ptr.dtype.element_ty
        if NSPLIT == 1:
            tl.store(y_ptr + head * HD + d, (acc / l_i).to(y_dt))
        else:
            cell = head * NSPLIT + sp
            tl.store(part_ptr + cell * HD + d, acc)
            tl.store(m_ptr + cell, m_i)
            tl.store(l_ptr + cell, l_i)
            tl.debug_barrier()  # every thread's partial is written before the counter says so
            done = tl.atomic_add(count_ptr + head, 1, sem="acq_rel")
            if done == NSPLIT - 1:  # the last split of this head combines all of them
                cells = head * NSPLIT + tl.arange(0, NSPLIT)
                ms = tl.load(m_ptr + cells, cache_modifier=".cg")
                ls = tl.load(l_ptr + cells, cache_modifier=".cg")
                m = tl.max(ms, axis=0)  # split 0 is never empty, so finite
                wgt = tl.exp(ms - m)
                parts = tl.load(part_ptr + cells[:, None] * HD + d[None, :], cache_modifier=".cg")
                y = tl.sum(wgt[:, None] * parts, axis=0) / tl.sum(wgt * ls, axis=0)
                tl.store(y_ptr + head * HD + d, y.to(y_dt))
                tl.atomic_xchg(count_ptr + head, 0)

    @triton.jit
    def _product_store(w, wu, xv, res_ptr, out_ptr, rows, mask, SWIGLU: tl.constexpr, dt: tl.constexpr):  # noqa: ANN001, ANN202
        """out[rows] = SiLU(w xv) * (wu xv) (SWIGLU), else w xv + res[rows]; rounded where the torch ops round."""
        y = tl.sum(w.to(tl.float32) * xv[None, :], axis=1).to(dt).to(tl.float32)
        if SWIGLU:
            up = tl.sum(wu.to(tl.float32) * xv[None, :], axis=1).to(dt).to(tl.float32)
            y = (y * tl.sigmoid(y)).to(dt).to(tl.float32) * up  # F.silu(gate) * up
        else:
            y = y + tl.load(res_ptr + rows, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, y.to(dt), mask=mask)

    @triton.jit
    def _matvec_kernel(  # noqa: ANN202
        x_ptr,  # noqa: ANN001  (K,)
        nw_ptr,  # noqa: ANN001  (K,) RMSNorm weight (SWIGLU)
        w_ptr,  # noqa: ANN001  (N, K), or (2N, K) stacked [W_gate; W_up] (SWIGLU)
        res_ptr,  # noqa: ANN001  (N,) residual (not SWIGLU)
        out_ptr,  # noqa: ANN001  (N,)
        N,  # noqa: ANN001
        eps,  # noqa: ANN001
        K: tl.constexpr,
        KP: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SWIGLU: tl.constexpr,  # out = SiLU(W_gate h) * (W_up h), h = RMSNorm(x); else out = W x + res
        ROUND_NORM: tl.constexpr,
        PDL: tl.constexpr,
        EARLY: tl.constexpr,
    ):
        _launch_next(PDL, EARLY, False)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, KP)
        mask_k = offs_k < K
        w = _row_tile(w_ptr, rows, rows < N, offs_k, mask_k, K)
        if SWIGLU:  # the up_proj rows i of the stacked weight, with the gate_proj rows i
            wu = _row_tile(w_ptr, rows + N, rows < N, offs_k, mask_k, K)
        else:
            wu = w
        _wait_previous(PDL)
        if SWIGLU:
            xv = _rms_input(x_ptr, nw_ptr, eps, offs_k, mask_k, K, ROUND_NORM)
        else:
            xv = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        _launch_next(PDL, EARLY, True)
        dt = x_ptr.dtype.element_ty
        _product_store(w, wu, xv, res_ptr, out_ptr, rows, rows < N, SWIGLU, dt)

    @triton.jit
    def _argmax_key(best, idx):  # noqa: ANN001, ANN202
        """(value, index) -> int64 whose order is value's, then the smaller index: floats as ordered int32 bits."""
        bits = best.to(tl.int32, bitcast=True)
        ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
        return (ordered << 32) + (tl.full((), 4294967295, tl.int64) - idx.to(tl.int64))

    @triton.jit
    def _lm_head_kernel(  # noqa: ANN202
        x_ptr,  # noqa: ANN001  (K,)
        nw_ptr,  # noqa: ANN001  (K,) final norm weight
        w_ptr,  # noqa: ANN001  (V, K) output projection
        logits_ptr,  # noqa: ANN001  (V,) float32 (STORE_LOGITS)
        key_ptr,  # noqa: ANN001  () int64 running argmax key, the lowest int64 between steps
        count_ptr,  # noqa: ANN001  () int32 finished programs, zero between steps
        tok_ptr,  # noqa: ANN001  (1, 1) int64 current token (out)
        out_ptr,  # noqa: ANN001  (1, total) int64 generated tokens (out at slot + 1)
        slot_ptr,  # noqa: ANN001  () int64, advanced by one
        V,  # noqa: ANN001
        eps,  # noqa: ANN001
        K: tl.constexpr,
        KP: tl.constexpr,
        BLOCK_N: tl.constexpr,
        ROUND_NORM: tl.constexpr,
        STORE_LOGITS: tl.constexpr,
        PDL: tl.constexpr,
        EARLY: tl.constexpr,
    ):
        _launch_next(PDL, EARLY, False)
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        n_tiles = tl.cdiv(V, BLOCK_N)
        offs_k = tl.arange(0, KP)
        mask_k = offs_k < K
        lane = tl.arange(0, BLOCK_N)
        rows = pid * BLOCK_N + lane
        w = _row_tile(w_ptr, rows, rows < V, offs_k, mask_k, K)
        _wait_previous(PDL)
        h = _rms_input(x_ptr, nw_ptr, eps, offs_k, mask_k, K, ROUND_NORM)
        _launch_next(PDL, EARLY, True)
        dt = x_ptr.dtype.element_ty
        best = tl.full([BLOCK_N], float("-inf"), tl.float32)
        best_idx = tl.full([BLOCK_N], 2147483647, tl.int32)
        for t in range(pid, n_tiles, nprog):
            rows = t * BLOCK_N + lane
            y = tl.sum(w.to(tl.float32) * h[None, :], axis=1).to(dt).to(tl.float32)
            nxt = (t + nprog) * BLOCK_N + lane  # next tile's rows, loaded before this one is reduced further
            w = _row_tile(w_ptr, nxt, nxt < V, offs_k, mask_k, K)
            if STORE_LOGITS:
                tl.store(logits_ptr + rows, y, mask=rows < V)
            y = tl.where(rows < V, y, float("-inf"))
            better = y > best  # strictly: an earlier tile keeps ties (the first index wins)
            best = tl.where(better, y, best)
            best_idx = tl.where(better, rows, best_idx)
        top = tl.max(best, axis=0)
        idx = tl.min(tl.where(best == top, best_idx, 2147483647), axis=0)
        tl.atomic_max(key_ptr, _argmax_key(top, idx), sem="relaxed")
        tl.debug_barrier()
        done = tl.atomic_add(count_ptr, 1, sem="acq_rel")
        if done == nprog - 1:  # the last program: the argmax is complete
            low32 = tl.full((), 4294967295, tl.int64)
            lowest = tl.full((), -2147483648, tl.int64) << 32
            key = tl.atomic_xchg(key_ptr, lowest, sem="acq_rel")
            tok = low32 - (key & low32)
            slot = tl.load(slot_ptr)
            tl.store(tok_ptr, tok)
            tl.store(out_ptr + slot + 1, tok)
            tl.store(slot_ptr, slot + 1)
            tl.atomic_xchg(count_ptr, 0)


class DecodeChain:
    """The buffers and launches of one greedy decode step of ``model`` on a batch-1 cache (see the module doc).

    ``step()`` reads the token ``tok`` (1, 1) at cache slot ``slot`` (0-d, int64), writes the next token into
    ``tok`` and ``out[0, slot + 1]`` and advances ``slot``, as ``ChainDecoder`` replays it; every
    launch has fixed arguments, so the step can be captured in a CUDA graph. ``store_logits`` also keeps the
    float32 logits of the last step in ``self.logits`` (for tests). Check ``chain_unsupported`` first.
    """

    def __init__(
        self,
        model: Llama,
        fused: FusedWeights,
        cache: nn.ModuleList,
        tok: torch.Tensor,
        slot: torch.Tensor,
        out: torch.Tensor,
        *,
        options: ChainOptions | None = None,
        store_logits: bool = False,
    ) -> None:
        c = model.config
        t = options or OPTIONS
        dev = tok.device
        dtype = model.embed_tokens.weight.dtype
        self.model, self.fused, self.cache, self.tok, self.slot, self.out = model, fused, cache, tok, slot, out
        cap = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else (0, 0)
        self.pdl = t.pdl and cap >= (9, 0) and not _INTERPRET
        self.D, self.S = c.dim, cache[0].k.shape[2]
        self.hd, self.nq, self.nkv = c.head_dim, c.n_heads, c.n_kv_heads
        self.hidden, self.vocab = fused[0][1].shape[0] // 2, model.lm_head.weight.shape[0]
        self.eps = [(b.input_layernorm.eps, b.post_attention_layernorm.eps) for b in model.layers] + [model.norm.eps]
        positions = torch.arange(self.S, device=dev)
        cos, sin = rope_cos_sin(positions, model.inv_freq)  # (S, HD): the model's own tables
        half = self.hd // 2
        self.cos, self.sin = cos[:, :half].contiguous(), sin[:, :half].contiguous()
        self.g = self.nq // self.nkv
        self.nsplit = min(t.max_splits, _pow2(-(-self.S // t.split_keys)))
        f32 = torch.float32
        self.x = torch.zeros(self.D, dtype=dtype, device=dev)
        self.x2 = torch.zeros_like(self.x)
        self.q = torch.zeros(self.nq * self.hd, dtype=dtype, device=dev)
        self.y = torch.zeros_like(self.q)
        self.act = torch.zeros(self.hidden, dtype=dtype, device=dev)
        self.part = torch.zeros(self.nq * self.nsplit * self.hd, dtype=f32, device=dev)
        self.m = torch.zeros(self.nq * self.nsplit, dtype=f32, device=dev)
        self.lsum = torch.zeros_like(self.m)
        self.counts = torch.zeros(self.nq + 1, dtype=torch.int32, device=dev)
        self.key = torch.full((), torch.iinfo(torch.int64).min, dtype=torch.int64, device=dev)
        self.store_logits = store_logits
        self.logits = torch.zeros(self.vocab if store_logits else 1, dtype=f32, device=dev)
        self.round_norm = torch.promote_types(dtype, model.norm.weight.dtype) == dtype

        def rows_for(k: int, lo: int = 1, hi: int = 64) -> int:
            return max(lo, min(hi, t.tile_elems // _pow2(k)))

        self.kp, self.kp_down = _pow2(self.D), _pow2(self.hidden)
        self.block_pair = min(half, max(1, rows_for(self.D) // 2))  # q/k/v: pairs of rows in one head
        self.block_gu = max(1, rows_for(self.D) // 2)  # SwiGLU: rows of W_gate and of W_up
        self.block_o = rows_for(self.nq * self.hd)
        self.block_down = rows_for(self.hidden)
        self.block_lm = rows_for(self.D)
        sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4
        self.lm_programs = max(1, min(triton.cdiv(self.vocab, self.block_lm), t.lm_programs_per_sm * sms))
        self.warps, self.early = t.warps, t.early_launch
        self.attn_block = t.attn_block

    def step(self) -> None:
        """Launch the 2 + 5 n_layers kernels of one token (all on the current stream)."""
        m, w = self.model, self.warps
        pk = {"EARLY": self.early, **launch_options(self.pdl)}
        D, hd, half = self.D, self.hd, self.hd // 2
        _embed_kernel[(triton.cdiv(D, 1024),)](self.tok, m.embed_tokens.weight, self.x, D, BLOCK=1024, **pk)
        n_qkv = (self.nq + 2 * self.nkv) * (half // self.block_pair)
        n_o, n_gu = triton.cdiv(D, self.block_o), triton.cdiv(self.hidden, self.block_gu)
        n_down = triton.cdiv(D, self.block_down)
        scale = hd**-0.5
        for i, layer in enumerate(m.layers):
            a = layer.self_attn
            eps1, eps2 = self.eps[i]
            kv = self.cache[i]
            w_qkv, w_gu = self.fused[i]
            _qkv_rope_kernel[(n_qkv,)](
                self.x, layer.input_layernorm.weight, w_qkv, self.cos, self.sin, self.slot, self.q, kv.k, kv.v,
                eps1, self.S, K=D, KP=self.kp, HD=hd, NQ=self.nq, NKV=self.nkv, BLOCK_P=self.block_pair,
                ROUND_NORM=self.round_norm, num_warps=w, **pk,
            )  # fmt: skip
            _attention_kernel[(self.nq, self.nsplit)](
                self.q, kv.k, kv.v, self.slot, self.part, self.m, self.lsum, self.counts, self.y, self.S, scale,
                HD=hd, G=self.g, NSPLIT=self.nsplit, BLOCK_S=self.attn_block, num_warps=4, num_stages=3, **pk,
            )  # fmt: skip
            _matvec_kernel[(n_o,)](
                self.y, self.y, a.o_proj.weight, self.x, self.x2, D, 0.0, K=self.nq * hd, KP=_pow2(self.nq * hd),
                BLOCK_N=self.block_o, SWIGLU=False, ROUND_NORM=False, num_warps=w, **pk,
            )  # fmt: skip
            _matvec_kernel[(n_gu,)](
                self.x2, layer.post_attention_layernorm.weight, w_gu, self.x2, self.act, self.hidden, eps2, K=D,
                KP=self.kp, BLOCK_N=self.block_gu, SWIGLU=True, ROUND_NORM=self.round_norm,
                num_warps=w, **pk,
            )  # fmt: skip
            _matvec_kernel[(n_down,)](
                self.act, self.act, layer.mlp.down_proj.weight, self.x2, self.x, D, 0.0, K=self.hidden,
                KP=self.kp_down, BLOCK_N=self.block_down, SWIGLU=False, ROUND_NORM=False,
                num_warps=w, **pk,
            )  # fmt: skip
        _lm_head_kernel[(self.lm_programs,)](
            self.x, m.norm.weight, m.lm_head.weight, self.logits, self.key, self.counts[self.nq :], self.tok,
            self.out, self.slot, self.vocab, self.eps[-1], K=D, KP=self.kp, BLOCK_N=self.block_lm,
            ROUND_NORM=self.round_norm, STORE_LOGITS=self.store_logits, num_warps=w, **pk,
        )  # fmt: skip


def sample_into(
    logits: torch.Tensor,
    how: Sampler,
    settings: tuple[torch.Tensor, ...],
    seen: torch.Tensor,
    count: torch.Tensor,
    tok: torch.Tensor,
    out: torch.Tensor,
    slot: torch.Tensor,
    **parts,  # noqa: ANN003 - choose_tokens' threshold= and draw=
) -> None:
    """Replace the token at ``out[0, slot]`` (and ``tok``) by one chosen from float32 ``logits`` ``(1, V)`` as
    ``how`` says (``notelab.lm.sampling.choose_tokens``, with ``parts``), in place; counts the token. Fixed
    buffers only."""
    temperature, top_k, top_p, penalty, seed = settings
    nxt, _ = choose_tokens(
        logits, how, temperature=temperature, top_k=top_k, top_p=top_p, penalty=penalty,
        seen=seen, seed=seed, counter=count, **parts,
    )  # fmt: skip
    tok.copy_(nxt[:, None])
    out.index_copy_(1, slot.view(1), nxt[:, None])
    if how.penalty:
        seen.scatter_(1, nxt[:, None], True)
    count.add_(1)


class ChainDecoder:
    """Batch-1 decoding with the chain: a cache of ``total`` slots, the step captured in a CUDA graph on GPU
    (replayed once a token), and the prompt's forward captured per prompt length (the last one kept).

    Greedy decoding takes the chain's own argmax; any other processing (``Sampler``) runs after the chain's
    step in the same graph, on the logits it stores (``sample_into``, compiled by inductor on CUDA with the
    threshold and draw kernels of ``notelab.lm.nucleus``; on a compiler failure, eager, said once).
    ``run(prompt, steps, how, settings)`` yields the ``steps`` new tokens in chunks of ``sync`` read back one
    chunk behind, so the device never waits for Python. The stacked weights are refreshed at each run: the
    model may have changed in place since the capture.
    """

    def __init__(self, model: Llama, total: int, sync: int = 16) -> None:
        w = model.embed_tokens.weight
        dev = w.device
        self.model, self.total, self.sync = model, total, sync
        self.fused = model.fused_decode_weights()
        self.cache = model.make_cache(1, total, dtype=w.dtype)
        long = dict(dtype=torch.long, device=dev)
        self.tok = torch.zeros(1, 1, **long)
        self.slot = torch.zeros((), **long)
        self.out = torch.zeros(1, total, **long)
        self.chain = DecodeChain(model, self.fused, self.cache, self.tok, self.slot, self.out, store_logits=True)
        f32 = dict(dtype=torch.float32, device=dev)
        # temperature, top_k, top_p, repetition penalty (1, 1) and the noise seed (1,), as Engine keeps them
        self.settings = (
            torch.zeros(1, 1, **f32), torch.ones(1, 1, **long), torch.ones(1, 1, **f32), torch.ones(1, 1, **f32),
            torch.zeros(1, **long),
        )  # fmt: skip
        self.count = torch.zeros(1, **long)
        self.seen = torch.zeros(1, model.config.vocab_size, dtype=torch.bool, device=dev)
        self.cuda = dev.type == "cuda"
        self.sampler = sample_into
        if self.cuda:  # the token choice by the kernels of notelab.lm.nucleus, compiled with the steps around them
            fast = partial(sample_into, threshold=pivot_threshold, draw=draw_tokens)
            self.sampler = torch.compile(fast, fullgraph=True, dynamic=False)
        self.graphs: dict[Sampler, torch.cuda.CUDAGraph] = {}
        self.prefill_graph: tuple[tuple, torch.Tensor, torch.cuda.CUDAGraph] | None = None

    def _capture(self, fn, reset) -> torch.cuda.CUDAGraph:  # noqa: ANN001
        """Warm ``fn`` up on a side stream (``reset`` before each run puts the state back), then record it."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                reset()
                fn()
            reset()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph

    def _pick(self, logits: torch.Tensor, how: Sampler) -> None:
        args = (logits, how, self.settings, self.seen, self.count, self.tok, self.out, self.slot)
        try:
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):  # one version per kind and length
                self.sampler(*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure: the eager function still runs
            if self.sampler is sample_into:
                raise
            warnings.warn(f"ChainDecoder: compiling the sampler failed ({type(e).__name__}); eager", RuntimeWarning)
            self.sampler = sample_into
            self.sampler(*args)

    def _step(self, how: Sampler) -> None:
        self.chain.step()
        if how != Sampler():
            self._pick(self.chain.logits[None], how)

    def _prefill(self, tokens: torch.Tensor, how: Sampler) -> None:
        P = tokens.shape[1]
        logits = self.model._forward(tokens, 0, None, None, self.cache, 1)[:, -1]
        self.slot.fill_(P)
        if how == Sampler():
            first = logits.argmax(dim=-1, keepdim=True)
            self.tok.copy_(first)
            self.out[:, P : P + 1] = first
        else:
            self.count.zero_()
            self._pick(logits.float(), how)

    def prefill(self, tokens: torch.Tensor, how: Sampler) -> None:
        """The prompt ``(1, P)`` into the cache, its first token into ``tok`` and ``out[0, P]``, ``P`` into
        ``slot``; on GPU a graph replay once this prompt length has been seen."""
        key = (tokens.shape[1], how)
        held = self.prefill_graph
        if not self.cuda:
            self._prefill(tokens, how)
        elif held is not None and held[0] == key:
            held[1].copy_(tokens)
            held[2].replay()
        else:
            buf = tokens.clone()
            self.prefill_graph = None
            # repeating the prefill repeats its writes (count restarts at 0, the same token), so no reset
            graph = self._capture(lambda: self._prefill(buf, how), lambda: None)
            self.prefill_graph = (key, buf, graph)
            graph.replay()

    def run(self, prompt: torch.Tensor, steps: int, how: Sampler, settings: tuple[float, int, float, float, int]):  # noqa: ANN201
        """The ``steps`` new tokens for ``prompt`` ``(1, P)``, in chunks (lists of ints); ``settings``: temperature,
        top_k, top_p, repetition penalty, seed, as numbers."""
        P = prompt.shape[1]
        self.model.fused_decode_weights(out=self.fused)
        for buf, v in zip(self.settings, settings):
            buf.fill_(v)
        self.seen.zero_()
        if how.penalty:
            self.seen.scatter_(1, prompt, True)
        seen = self.seen.clone()
        graph = self.graphs.get(how)
        if self.cuda and graph is None:  # recorded from slot 0 with the state put back: writes stay in range
            state = [self.tok, self.slot, self.count, self.seen, self.out]
            saved = [t.clone() for t in state]

            def reset() -> None:
                for t, v in zip(state, saved):
                    t.copy_(v)
                self.slot.zero_()

            graph = self.graphs[how] = self._capture(lambda: self._step(how), reset)
            reset()
        self.seen.copy_(seen)
        self.prefill(prompt, how)
        pending = None
        for a in range(0, steps, self.sync):
            b = min(a + self.sync, steps)
            for _ in range(max(a, 1), b):  # token j (j >= 1) comes from step j
                if graph is not None:
                    graph.replay()
                else:
                    self._step(how)
            host = self.out[0, P + a : P + b].to("cpu", non_blocking=self.cuda)
            ready = torch.cuda.Event() if self.cuda else None
            if ready is not None:
                ready.record()
            if pending is not None:  # the previous chunk, read while the device computes this one
                if pending[0] is not None:
                    pending[0].synchronize()
                yield pending[1].tolist()
            pending = (ready, host)
        if pending is not None:
            if pending[0] is not None:
                pending[0].synchronize()
            yield pending[1].tolist()
