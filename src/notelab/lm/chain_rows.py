"""The decode step of a batch of rows as Triton kernels: ``notelab.lm.chain`` for 2 to 32 rows.

A candidate, not yet measured on a GPU, so ``generate`` does not take it (benchmarks/RESULTS.md: the engine's
compiled batched step reaches 44% of the batch roofline, the batch-1 chain 73% of its own). Each row ``b``
holds one token at its own cache slot ``p_b`` (rows of any lengths, as the engine keeps them). With ``x`` the
``(B, D)`` residual rows:

    x = E[tok]                                                                            (torch)
    for each layer:
        [q; k; v] = RMSNorm(x) W_qkv^T;  q, k <- RoPE at p_b;  K[b, :, p_b], V[b, :, p_b] <- k, v   _qkv_kernel
        y  = softmax(q K[b, :, 0..p_b]^T / sqrt(D)) V[b, :, 0..p_b]          notelab.lm.chain._attention_kernel
        x2 = x + y W_o^T                                                                   _product_kernel
        a  = SiLU(h W_gate^T) * (h W_up^T),  h = RMSNorm(x2)                               _product_kernel
        x  = x2 + a W_down^T                                                               _product_kernel
    logits = W_out RMSNorm(x)                                          (torch: the model's own modules)

Why tiles rather than the chain's whole weight rows: at batch 1 a program holds whole rows of ``W`` and reads
``x`` once; with ``B`` input rows, a program holding ``r`` weight rows reads all ``B`` inputs for those ``r``
rows, so the inputs cost ``B / r`` times the weights' bytes. Here a program owns ``BN`` weight rows and walks
``K`` in chunks of ``BK``: each chunk of ``W`` (``BN x BK``) meets the rows' chunk (``BM x BK``, the rows padded
to ``BM >= 16``) in one tensor-core product (``tl.dot``, float32 accumulation), so the inputs are read once per
``BN`` weight rows. Every rounding is where the torch step rounds (as in the chain): the norms, the products
in the weights' dtype, RoPE, the SiLU product and the residual adds; so in float32 the logits are the torch
model's. Programmatic dependent launch as in the chain: each kernel lets the next one launch early and waits
for the previous one before reading its output (here weights are not loaded before the wait: the chunked
loop reads them; the launch latency is still hidden).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from notelab.core.errors import ConfigError
from notelab.core.rope import rope_cos_sin
from notelab.lm.chain import _INTERPRET, _pow2, chain_unsupported, triton
from notelab.lm.model import FusedWeights, Llama

if triton is not None:  # triton is optional (notelab.lm.chain imports it when present)
    from notelab.lm.chain import _attention_kernel, _launch_next, _rope_pair, _wait_previous, tl

__all__ = ["MAX_ROWS", "DecodeRows", "RowsOptions", "rows_unsupported"]

MAX_ROWS = 32  # rows padded to a tile of at most this many (tl.dot's M)
_INTERPRET_DOT = tl.constexpr(_INTERPRET) if triton is not None else False


@dataclass(frozen=True)
class RowsOptions:
    """Tile sizes: ``bn`` weight rows a product program owns, ``bk`` the chunk of ``K`` per step, ``pairs`` RoPE
    pairs of rows a q/k/v program owns; ``split``: programs that share one tile's ``K`` in the products with few
    output rows (q/k/v, o_proj, down_proj: a few dozen tiles would leave most of the GPU's SMs idle; the last
    program of a tile adds the float32 partials in a fixed order, so steps are deterministic); warps and
    software-pipelining stages of the product kernels; the attention's ``attn_block`` / ``split_keys`` /
    ``max_splits`` as in ``notelab.lm.chain.ChainOptions``; ``pdl``: programmatic dependent launch where the GPU
    has it."""

    bn: int = 32
    bk: int = 128
    pairs: int = 16
    split: int = 4
    warps: int = 4
    stages: int = 3
    attn_block: int = 64
    split_keys: int = 512
    max_splits: int = 16
    pdl: bool = True


def rows_unsupported(model: Llama, batch: int, dtype: torch.dtype) -> str:
    """Why these kernels cannot run a step of ``batch`` rows of ``model`` ("" when they can): the chain's
    conditions (RoPE + RMSNorm + bias-free SwiGLU, stacked weights, one dtype, CUDA or the interpreter), and
    2 <= batch <= MAX_ROWS."""
    if not 2 <= batch <= MAX_ROWS:
        return f"2 to {MAX_ROWS} rows, got {batch}"
    if not _INTERPRET and model.config.head_dim < 32:
        return f"head_dim >= 32 (tensor-core tiles of 16 RoPE pairs), got {model.config.head_dim}"
    return chain_unsupported(model, 1, False, dtype)


if triton is not None:

    @triton.jit
    def _rstd_rows(x_ptr, rm, mask_m, eps, K: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr):  # noqa: ANN001, ANN202
        """1 / sqrt(mean(x^2) + eps) of each row ``rm`` of the (B, K) ``x``, in float32."""
        ss = tl.zeros([BM], tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            xv = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=mask_m[:, None] & (rk < K)[None, :], other=0.0)
            xv = xv.to(tl.float32)
            ss += tl.sum(xv * xv, axis=1)
        return tl.math.rsqrt(ss / K + eps)

    @triton.jit
    def _input_chunk(x_ptr, nw_ptr, rstd, rm, mask_m, rk, mask_k, NORM: tl.constexpr, K: tl.constexpr):  # noqa: ANN001, ANN202
        """The rows' chunk ``rk`` of x, or of RMSNorm(x) rounded where ``notelab.core.norms.rms_norm`` rounds."""
        dt = x_ptr.dtype.element_ty
        xv = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if NORM:
            g = tl.load(nw_ptr + rk, mask=mask_k, other=0.0).to(tl.float32)
            xv = ((xv.to(tl.float32) * rstd[:, None]).to(dt).to(tl.float32) * g[None, :]).to(dt)
        return xv

    @triton.jit
    def _weight_chunk(w_ptr, rows, mask_r, rk, mask_k, K: tl.constexpr):  # noqa: ANN001, ANN202
        """Rows ``rows`` of a row-major (N, K) weight at columns ``rk``: read once per step, not kept in cache."""
        ptrs = w_ptr + rows.to(tl.int64)[:, None] * K + rk[None, :]
        return tl.load(ptrs, mask=mask_r[:, None] & mask_k[None, :], other=0.0, eviction_policy="evict_first")

    @triton.jit
    def _dot(a, b, acc, PRECISION: tl.constexpr):  # noqa: ANN001, ANN202
        """``acc + a b`` with float32 accumulation. Triton's interpreter multiplies bf16 operands wrongly, so there
        they are widened first: products of bf16 values are exact in float32, as on the tensor cores."""
        if _INTERPRET_DOT:
            a, b = a.to(tl.float32), b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision=PRECISION)

    @triton.jit
    def _k_range(K: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr):  # noqa: ANN202
        """This program's share of ``K``: chunks of ``BK``, dealt out evenly over the ``SPLIT`` programs of a tile."""
        chunks: tl.constexpr = (K + BK - 1) // BK
        per: tl.constexpr = (chunks + SPLIT - 1) // SPLIT
        lo = tl.program_id(1) * per * BK
        return lo, tl.minimum(lo + per * BK, K)

    @triton.jit
    def _publish(acc, part_ptr, cells, STRIDE):  # noqa: ANN001, ANN202
        """Store this program's float32 partial ``acc`` at ``cells`` of its split's slab (``STRIDE`` apart)."""
        tl.store(part_ptr + tl.program_id(1) * STRIDE + cells, acc)

    @triton.jit
    def _last_of_tile(count_ptr, tile, SPLIT: tl.constexpr):  # noqa: ANN001, ANN202
        """True in the last of the ``SPLIT`` programs of ``tile`` to arrive (after every partial is stored); that
        program also zeroes the counter for the next step."""
        tl.debug_barrier()  # every thread's partial is written before the counter says so
        last = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel") == SPLIT - 1
        if last:
            tl.atomic_xchg(count_ptr + tile, 0)
        return last

    @triton.jit
    def _gather(part_ptr, cells, STRIDE, SPLIT: tl.constexpr):  # noqa: ANN001, ANN202
        """The partials at ``cells`` summed over the splits in a fixed order (0, 1, ...): the same sum every step."""
        total = tl.load(part_ptr + cells, cache_modifier=".cg")
        for sp in tl.static_range(1, SPLIT):
            total += tl.load(part_ptr + sp * STRIDE + cells, cache_modifier=".cg")
        return total

    @triton.jit
    def _product_kernel(  # noqa: ANN202
        x_ptr,  # noqa: ANN001  (B, K) input rows
        nw_ptr,  # noqa: ANN001  (K,) RMSNorm weight (NORM)
        w_ptr,  # noqa: ANN001  (N, K), or (2N, K) stacked [W_gate; W_up] (SWIGLU)
        res_ptr,  # noqa: ANN001  (B, N) residual (not SWIGLU)
        out_ptr,  # noqa: ANN001  (B, N)
        part_ptr,  # noqa: ANN001  (SPLIT, BM, tiles BN) float32 partials (SPLIT > 1)
        count_ptr,  # noqa: ANN001  (tiles,) int32 arrived splits, zero between launches
        B,  # noqa: ANN001
        N,  # noqa: ANN001
        eps,  # noqa: ANN001
        K: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
        NORM: tl.constexpr,  # the input is RMSNorm(x)
        SWIGLU: tl.constexpr,  # out = SiLU(h W_gate^T) * (h W_up^T); else out = x W^T + res
        SPLIT: tl.constexpr,  # programs sharing a tile's K (not SWIGLU)
        PRECISION: tl.constexpr,
        PDL: tl.constexpr,
    ):
        _launch_next(PDL, True, False)
        tile = tl.program_id(0)
        rm = tl.arange(0, BM)
        rn = tile * BN + tl.arange(0, BN)
        mask_m, mask_n = rm < B, rn < N
        _wait_previous(PDL)
        dt = x_ptr.dtype.element_ty
        rstd = tl.zeros([BM], tl.float32)
        if NORM:
            rstd = _rstd_rows(x_ptr, rm, mask_m, eps, K, BK, BM)
        acc = tl.zeros([BM, BN], tl.float32)
        acc_up = tl.zeros([BM, BN], tl.float32)
        lo, hi = _k_range(K, BK, SPLIT)
        for k0 in range(lo, hi, BK):
            rk = k0 + tl.arange(0, BK)
            mask_k = rk < K
            xv = _input_chunk(x_ptr, nw_ptr, rstd, rm, mask_m, rk, mask_k, NORM, K)
            w = _weight_chunk(w_ptr, rn, mask_n, rk, mask_k, K)
            acc = _dot(xv, tl.trans(w), acc, PRECISION)
            if SWIGLU:  # the up_proj rows i of the stacked weight, with the gate_proj rows i
                wu = _weight_chunk(w_ptr, rn + N, mask_n, rk, mask_k, K)
                acc_up = _dot(xv, tl.trans(wu), acc_up, PRECISION)
        mask = mask_m[:, None] & mask_n[None, :]
        if SWIGLU:
            y = acc.to(dt).to(tl.float32)
            y = (y * tl.sigmoid(y)).to(dt).to(tl.float32) * acc_up.to(dt).to(tl.float32)  # F.silu(gate) * up
            tl.store(out_ptr + rm[:, None] * N + rn[None, :], y.to(dt), mask=mask)
        elif SPLIT == 1:
            _residual_store(acc, res_ptr, out_ptr, rm, rn, mask, N)
        else:
            stride = BM * tl.num_programs(0) * BN
            cells = rm[:, None] * (tl.num_programs(0) * BN) + rn[None, :]
            _publish(acc, part_ptr, cells, stride)
            if _last_of_tile(count_ptr, tile, SPLIT):
                _residual_store(_gather(part_ptr, cells, stride, SPLIT), res_ptr, out_ptr, rm, rn, mask, N)

    @triton.jit
    def _residual_store(acc, res_ptr, out_ptr, rm, rn, mask, N):  # noqa: ANN001, ANN202
        """out = round(acc) + res at rows ``rm``, columns ``rn``, rounded where the torch step rounds."""
        dt = out_ptr.dtype.element_ty
        y = acc.to(dt).to(tl.float32)
        y = y + tl.load(res_ptr + rm[:, None] * N + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], y.to(dt), mask=mask)

    @triton.jit
    def _qkv_kernel(  # noqa: ANN202
        x_ptr,  # noqa: ANN001  (B, K) residual rows
        nw_ptr,  # noqa: ANN001  (K,) input_layernorm weight
        w_ptr,  # noqa: ANN001  ((NQ + 2 NKV) HD, K) stacked [W_q; W_k; W_v]
        cos_ptr,  # noqa: ANN001  (S, HD/2) float32 cos(p theta_i)
        sin_ptr,  # noqa: ANN001
        slot_ptr,  # noqa: ANN001  (B,) int64 each row's cache slot = position
        q_ptr,  # noqa: ANN001  (B, NQ HD) out
        k_ptr,  # noqa: ANN001  (B, NKV, S, HD) cache
        v_ptr,  # noqa: ANN001
        part_ptr,  # noqa: ANN001  (SPLIT, BM, 2 tiles BP) float32 partials (SPLIT > 1)
        count_ptr,  # noqa: ANN001  (tiles,) int32 arrived splits, zero between launches
        B,  # noqa: ANN001
        eps,  # noqa: ANN001
        S,  # noqa: ANN001
        K: tl.constexpr,
        BM: tl.constexpr,
        BP: tl.constexpr,
        BK: tl.constexpr,
        HD: tl.constexpr,
        NQ: tl.constexpr,
        NKV: tl.constexpr,
        SPLIT: tl.constexpr,  # programs sharing a tile's K
        PRECISION: tl.constexpr,
        PDL: tl.constexpr,
    ):
        _launch_next(PDL, True, False)
        HALF: tl.constexpr = HD // 2
        PER_HEAD: tl.constexpr = HALF // BP
        pid = tl.program_id(0)
        head = pid // PER_HEAD
        j = (pid % PER_HEAD) * BP + tl.arange(0, BP)  # pair index in the head: features j, j + HALF
        r1 = head * HD + j
        rm = tl.arange(0, BM)
        mask_m = rm < B
        mask_p = j < HALF
        _wait_previous(PDL)
        dt = x_ptr.dtype.element_ty
        rstd = _rstd_rows(x_ptr, rm, mask_m, eps, K, BK, BM)
        acc1 = tl.zeros([BM, BP], tl.float32)
        acc2 = tl.zeros([BM, BP], tl.float32)
        lo, hi = _k_range(K, BK, SPLIT)
        for k0 in range(lo, hi, BK):
            rk = k0 + tl.arange(0, BK)
            mask_k = rk < K
            h = _input_chunk(x_ptr, nw_ptr, rstd, rm, mask_m, rk, mask_k, True, K)
            acc1 = _dot(h, tl.trans(_weight_chunk(w_ptr, r1, mask_p, rk, mask_k, K)), acc1, PRECISION)
            acc2 = _dot(h, tl.trans(_weight_chunk(w_ptr, r1 + HALF, mask_p, rk, mask_k, K)), acc2, PRECISION)
        if SPLIT == 1:
            _qkv_store(acc1, acc2, cos_ptr, sin_ptr, slot_ptr, q_ptr, k_ptr, v_ptr, head, j, rm, mask_m, mask_p, S,
                       dt, HD, NQ, NKV)  # fmt: skip
        else:
            width = tl.num_programs(0) * 2 * BP  # both halves of every tile
            cells = rm[:, None] * width + pid * 2 * BP + tl.arange(0, BP)[None, :]
            _publish(acc1, part_ptr, cells, BM * width)
            _publish(acc2, part_ptr, cells + BP, BM * width)
            if _last_of_tile(count_ptr, pid, SPLIT):
                acc1 = _gather(part_ptr, cells, BM * width, SPLIT)
                acc2 = _gather(part_ptr, cells + BP, BM * width, SPLIT)
                _qkv_store(acc1, acc2, cos_ptr, sin_ptr, slot_ptr, q_ptr, k_ptr, v_ptr, head, j, rm, mask_m, mask_p,
                           S, dt, HD, NQ, NKV)  # fmt: skip

    @triton.jit
    def _qkv_store(  # noqa: ANN202
        acc1, acc2, cos_ptr, sin_ptr, slot_ptr, q_ptr, k_ptr, v_ptr, head, j, rm, mask_m, mask_p, S,  # noqa: ANN001
        dt: tl.constexpr, HD: tl.constexpr, NQ: tl.constexpr, NKV: tl.constexpr,
    ):  # fmt: skip
        """Round the products of pairs ``j`` of ``head``, rotate q and k by RoPE at each row's slot, and store q
        into ``q`` or k / v into the rows' cache slots."""
        HALF: tl.constexpr = HD // 2
        a1 = acc1.to(dt).to(tl.float32)
        a2 = acc2.to(dt).to(tl.float32)
        slots = tl.load(slot_ptr + rm, mask=mask_m, other=0).to(tl.int64)
        mask = mask_m[:, None] & mask_p[None, :]
        c = tl.load(cos_ptr + slots[:, None] * HALF + j[None, :], mask=mask, other=0.0)
        s = tl.load(sin_ptr + slots[:, None] * HALF + j[None, :], mask=mask, other=0.0)
        hv = head + 0 * (rm[:, None] + j[None, :])  # the head, as a tensor (for element masks)
        b1, b2 = _rope_pair(a1, a2, c, s, hv < NQ + NKV, dt)
        q_off = rm[:, None] * (NQ * HD) + head * HD + j[None, :]
        is_q = hv < NQ
        tl.store(q_ptr + q_off, b1, mask=mask & is_q)
        tl.store(q_ptr + q_off + HALF, b2, mask=mask & is_q)
        is_k = (hv >= NQ) & (hv < NQ + NKV)
        kv_head = tl.where(is_k, hv - NQ, hv - NQ - NKV).to(tl.int64)
        kv_off = ((rm.to(tl.int64)[:, None] * NKV + kv_head) * S + slots[:, None]) * HD + j[None, :]
        is_v = hv >= NQ + NKV
        tl.store(k_ptr + kv_off, b1, mask=mask & is_k)
        tl.store(k_ptr + kv_off + HALF, b2, mask=mask & is_k)
        tl.store(v_ptr + kv_off, b1, mask=mask & is_v)
        tl.store(v_ptr + kv_off + HALF, b2, mask=mask & is_v)


class DecodeRows:
    """The buffers and launches of one decode step of ``B`` rows (see the module doc): ``step()`` reads ``tok``
    ``(B, 1)`` at each row's cache slot ``pos`` ``(B,)`` and writes the float32 ``logits`` ``(B, V)`` of the next
    token; the caller picks the tokens and advances ``pos`` (as ``notelab.lm.engine`` does). Fixed buffers and
    launch arguments, so the step can be captured in a CUDA graph. Check ``rows_unsupported`` first."""

    def __init__(
        self,
        model: Llama,
        fused: FusedWeights,
        cache: nn.ModuleList,
        tok: torch.Tensor,
        pos: torch.Tensor,
        *,
        options: RowsOptions | None = None,
    ) -> None:
        c, t = model.config, options or RowsOptions()
        dev, dtype = tok.device, model.embed_tokens.weight.dtype
        B = tok.shape[0]
        why = rows_unsupported(model, B, cache[0].k.dtype)
        if why:
            raise ConfigError(f"DecodeRows: {why}")
        self.model, self.fused, self.cache, self.tok, self.pos, self.options = model, fused, cache, tok, pos, t
        cap = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else (0, 0)
        self.pdl = t.pdl and cap >= (9, 0) and not _INTERPRET
        self.B, self.D, self.S = B, c.dim, cache[0].k.shape[2]
        self.hd, self.nq, self.nkv = c.head_dim, c.n_heads, c.n_kv_heads
        self.hidden, self.vocab = fused[0][1].shape[0] // 2, model.lm_head.weight.shape[0]
        self.eps = [(b.input_layernorm.eps, b.post_attention_layernorm.eps) for b in model.layers]
        cos, sin = rope_cos_sin(torch.arange(self.S, device=dev), model.inv_freq)  # the model's own tables
        half = self.hd // 2
        self.cos, self.sin = cos[:, :half].contiguous(), sin[:, :half].contiguous()
        self.bm = max(16, _pow2(B))
        self.pairs = min(t.pairs, half)
        self.nsplit = min(t.max_splits, _pow2(-(-self.S // t.split_keys)))
        self.precision = "ieee" if dtype == torch.float32 else "tf32"  # float32 models: exact products
        f32 = torch.float32
        self.x = torch.zeros(B, self.D, dtype=dtype, device=dev)
        self.x2 = torch.zeros_like(self.x)
        self.q = torch.zeros(B, self.nq * self.hd, dtype=dtype, device=dev)
        self.y = torch.zeros_like(self.q)
        self.act = torch.zeros(B, self.hidden, dtype=dtype, device=dev)
        self.part = torch.zeros(B * self.nq * self.nsplit * self.hd, dtype=f32, device=dev)
        self.m = torch.zeros(B * self.nq * self.nsplit, dtype=f32, device=dev)
        self.lsum = torch.zeros_like(self.m)
        self.counts = torch.zeros(B * self.nq, dtype=torch.int32, device=dev)
        self.logits = torch.zeros(B, self.vocab, dtype=f32, device=dev)
        # Split-K of the q/k/v, o_proj and down_proj products: float32 partials and per-tile arrival counters
        self.n_qkv = (self.nq + 2 * self.nkv) * (half // self.pairs)
        self.n_d = -(-self.D // t.bn)  # tiles of the products with D outputs
        width = max(self.n_qkv * 2 * self.pairs, self.n_d * t.bn)
        self.split_part = torch.zeros(t.split * self.bm * width if t.split > 1 else 1, dtype=f32, device=dev)
        self.split_count = torch.zeros(max(self.n_qkv, self.n_d), dtype=torch.int32, device=dev)

    def step(self) -> None:
        """Embedding (torch), 5 kernels a layer, the final norm and output projection (torch) into ``logits``."""
        m, t, B, D, hd = self.model, self.options, self.B, self.D, self.hd
        pk = {"PDL": self.pdl, **({"launch_pdl": True} if self.pdl else {})}
        mm = {"BM": self.bm, "BK": t.bk, "PRECISION": self.precision, "num_warps": t.warps, "num_stages": t.stages}
        self.x.copy_(m.embed_tokens(self.tok[:, 0]))
        split = {"part_ptr": self.split_part, "count_ptr": self.split_count}
        for i, layer in enumerate(m.layers):
            eps1, eps2 = self.eps[i]
            kv = self.cache[i]
            w_qkv, w_gu = self.fused[i]
            _qkv_kernel[(self.n_qkv, t.split)](
                self.x, layer.input_layernorm.weight, w_qkv, self.cos, self.sin, self.pos, self.q, kv.k, kv.v,
                B=B, eps=eps1, S=self.S, K=D, BP=self.pairs, HD=hd, NQ=self.nq, NKV=self.nkv, SPLIT=t.split,
                **split, **mm, **pk,
            )  # fmt: skip
            _attention_kernel[(self.nq, self.nsplit, B)](
                self.q, kv.k, kv.v, self.pos, self.part, self.m, self.lsum, self.counts, self.y, self.S, hd**-0.5,
                HD=hd, G=self.nq // self.nkv, NSPLIT=self.nsplit, BLOCK_S=t.attn_block, EARLY=True, num_warps=4,
                num_stages=3, **pk,
            )  # fmt: skip
            self._product(self.y, self.y, layer.self_attn.o_proj.weight, self.x, self.x2, D, 0.0, False, mm, pk)
            self._product(self.x2, layer.post_attention_layernorm.weight, w_gu, self.x2, self.act, self.hidden, eps2,
                          True, mm, pk)  # fmt: skip
            self._product(self.act, self.act, layer.mlp.down_proj.weight, self.x2, self.x, D, 0.0, False, mm, pk)
        self.logits.copy_(m.lm_head(m.norm(self.x)))

    def _product(
        self, x: torch.Tensor, nw: torch.Tensor, w: torch.Tensor, res: torch.Tensor, out: torch.Tensor, N: int,
        eps: float, swiglu: bool, mm: dict, pk: dict,
    ) -> None:  # fmt: skip
        """out = SiLU(RMSNorm(x) W_gate^T) * (RMSNorm(x) W_up^T) (``swiglu``: many tiles, K whole), else
        x W^T + res with K split over ``options.split`` programs per tile."""
        bn, split = self.options.bn, 1 if swiglu else self.options.split
        _product_kernel[(triton.cdiv(N, bn), split)](
            x, nw, w, res, out, self.split_part, self.split_count, self.B, N, eps, K=x.shape[1], BN=bn, NORM=swiglu,
            SWIGLU=swiglu, SPLIT=split, **mm, **pk,
        )  # fmt: skip
