"""Products of a few rows by a wide weight, the decode step's shape, in one Triton kernel with the weight as the
tall operand.

A batched decode step multiplies ``B`` = 1-32 rows ``x`` ``(B, K)`` by each weight ``W`` ``(N, K)``: ``y = x W^T``,
bound by reading ``W``. Here a program takes ``BN`` rows of ``W`` and computes the transposed block

    y^T[n0 : n0 + BN, :] = W[n0 : n0 + BN, :] x^T        (tensor-core tiles of BN x BK times BK x BM, the rows of
                                                         x padded to BM >= 16 by masked loads)

streaming its ``BN x K`` slice of ``W`` through ``STAGES`` pipelined loads, so that even 2,048 outputs give
``2048 / BN`` programs that each read a contiguous slice. A wide K (down: 8,192) can be cut into ``split``
parts, a program each: each writes its float32 partial block, raises its tile's arrival count, and the last to
arrive adds the parts in the order of K (the same bits whichever arrives last), zeroes the count and runs the
epilogue. Three epilogues, the folded decode step's (``notelab.lm.folded``), each rounding where that step
rounds:

    plain        y = x W^T                                  rounded once to x's dtype
    accumulate   y <- y + x W^T   (y the residual rows)     float32 sum, rounded once (cuBLAS's beta = 1)
    gated        y = silu(r g) * (r u),  [g; u] = x [W_g; W_u]^T,  r = 1 / sqrt(mean(x^2) + eps)
                 (the SwiGLU of a layer whose RMSNorm gain is folded into W; each factor rounded to x's dtype
                 as ``notelab.lm.folded.gated_silu_torch`` rounds; r summed from the x blocks the program reads)

With ``pdl`` (CUDA, sm_90+) a kernel is launched with programmatic dependent launch: it may start before the
kernel ahead of it ends, waits for it (``gdc_wait``) before reading anything, then lets the next kernel launch;
a chain of such kernels hides the launch between them. Inductor does not pass that launch option to the kernels
of a compiled graph, so the products are an opaque operator that launches the kernel itself (with or without it).

Without a GPU the kernel runs through Triton's interpreter (``TRITON_INTERPRET=1``, read by
``notelab.lm.triton_env``), which is how the tests check it against the torch functions on CPU.
"""

from __future__ import annotations

import functools
from dataclasses import astuple, dataclass

import torch

from notelab.lm.triton_env import INTERPRET as _INTERPRET
from notelab.lm.triton_env import kernels_unsupported, launch_options, pdl_usable, tl, triton
from notelab.lm.triton_env import pow2 as _pow2

PLAIN, ACCUMULATE, GATED = 0, 1, 2


@dataclass(frozen=True)
class Tiles:
    """A program's share: ``bn`` weight rows (outputs), read ``bk`` columns at a time (of 16-bit weights; half as
    many of 32-bit ones) through ``stages`` pipelined loads, by ``warps`` warps; with ``split`` > 1, K is cut into
    ``split`` parts, one program each, whose float32 partial sums the last of them adds (in a fixed order)."""

    bn: int = 16
    bk: int = 256
    stages: int = 4
    warps: int = 4
    split: int = 1


# Per epilogue, the tiles measured fastest for the Llama-3.2-1B step at 8 and 32 rows on an H200
# (benchmarks/skinny_products.py; benchmarks/RESULTS.md, eleventh session)
ADD_TILES = Tiles(16, 256, 4, 4)  # o: 2,048 outputs
DOWN_TILES = Tiles(64, 128, 4, 4, 4)  # down: 2,048 outputs of 8,192 inputs, cut into four parts over K
QKV_TILES = Tiles(16, 256, 4, 2)  # [q; k; v]: 3,072 outputs
GATED_TILES = Tiles(64, 128, 4, 4)  # [gate; up]: 8,192 outputs, two weight tiles a stage
LINEAR_TILES = Tiles(64, 128, 4, 4)  # the output projection: 128,256 outputs


def skinny_unsupported(x: torch.Tensor, w: torch.Tensor) -> str:
    """Why :func:`skinny_linear` cannot run on ``x`` and ``w`` ("" when it can)."""
    why = kernels_unsupported(x)
    if why:
        return why
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        return f"expected x (B, K) and w (N, K), got {tuple(x.shape)} and {tuple(w.shape)}"
    if x.shape[0] > 64:
        return f"at most 64 rows (the kernel keeps them all in one tile), got {x.shape[0]}"
    if x.dtype != w.dtype:
        return f"x and w must share a dtype, got {x.dtype} and {w.dtype}"
    if torch.is_autocast_enabled(x.device.type):
        return "autocast is on (the products compute in its dtype)"
    return ""


if triton is not None:
    from notelab.lm.triton_env import dependent_launch

    @triton.jit
    def swiglu_rounded(g, u, r, dt: tl.constexpr):  # noqa: ANN001, ANN201
        """``silu(r g) * (r u)`` in float32 from ``g``, ``u`` (values of dtype ``dt``, as float32) and the row
        factor ``r``, each factor rounded to ``dt`` as ``notelab.lm.folded.gated_silu_torch`` rounds it."""
        gate = (g * r).to(dt).to(tl.float32)
        up = (u * r).to(dt).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)  # F.silu, rounded
        return act * up

    @triton.jit
    def _epilogue(acc, acc_u, ss, y_ptr, sy, rn, rm, live_n, live_m, K, eps, MODE: tl.constexpr):  # noqa: ANN001, ANN202
        dt = y_ptr.dtype.element_ty
        ptrs = y_ptr + rm[None, :] * sy + rn[:, None]  # y^T's block: (BN, BM)
        mask = live_n[:, None] & live_m[None, :]
        if MODE == 0:
            out = acc
        elif MODE == 1:
            out = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) + acc
        else:
            r = tl.math.rsqrt(ss / K + eps)[None, :]
            out = swiglu_rounded(acc.to(dt).to(tl.float32), acc_u.to(dt).to(tl.float32), r, dt)
        tl.store(ptrs, out.to(dt), mask=mask)

    @triton.jit
    def _skinny_kernel(  # noqa: ANN202
        x_ptr, sx, w_ptr, sw, y_ptr, sy, ws_ptr, count_ptr, B, N, K, KS, eps,  # noqa: ANN001
        MODE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
        SPLIT: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """Program (n, s): outputs [n BN, (n + 1) BN) of every row over columns [s KS, (s + 1) KS) of K (see the
        module doc); ``MODE`` the epilogue (gated: ``w`` is [W_g; W_u], 2N rows)."""
        dependent_launch(PDL)
        n, s = tl.program_id(0), tl.program_id(1)
        rn = n * BN + tl.arange(0, BN)
        rm = tl.arange(0, BM)
        live_n = rn < N
        live_m = rm < B
        wrow = w_ptr + rn.to(tl.int64)[:, None] * sw
        acc = tl.zeros((BN, BM), dtype=tl.float32)
        acc_u = tl.zeros((BN, BM), dtype=tl.float32)
        ss = tl.zeros((BM,), dtype=tl.float32)
        wrow_u = w_ptr + (rn + N).to(tl.int64)[:, None] * sw
        for k0 in range(s * KS, tl.minimum(s * KS + KS, K), BK):
            rk = k0 + tl.arange(0, BK)
            xmask, wmask = live_m[None, :], live_n[:, None]
            if not EVEN_K:  # the last block is partial
                xmask, wmask = xmask & (rk < K)[:, None], wmask & (rk < K)[None, :]
            xt = tl.load(x_ptr + rm[None, :] * sx + rk[:, None], mask=xmask, other=0.0)
            wt = tl.load(wrow + rk[None, :], mask=wmask, other=0.0, eviction_policy="evict_first")
            if IEEE:  # float32 operands (exact for bf16 ones): float32 models, and the interpreter (no bf16 dot)
                acc = tl.dot(wt.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(wt, xt, acc)
            if MODE == 2:
                wu = tl.load(wrow_u + rk[None, :], mask=wmask, other=0.0, eviction_policy="evict_first")
                if IEEE:
                    acc_u = tl.dot(wu.to(tl.float32), xt.to(tl.float32), acc_u, input_precision="ieee")
                else:
                    acc_u = tl.dot(wu, xt, acc_u)
                xf = xt.to(tl.float32)
                ss += tl.sum(xf * xf, 0)
        if SPLIT == 1:
            _epilogue(acc, acc_u, ss, y_ptr, sy, rn, rm, live_n, live_m, K, eps, MODE)
        else:  # partial sums to the workspace; the program of tile n that arrives last adds them, in order of s
            size = 3 * BN * BM if MODE == 2 else BN * BM
            block = tl.arange(0, BN)[:, None] * BM + rm[None, :]
            mine = ws_ptr + (n * SPLIT + s).to(tl.int64) * size
            tl.store(mine + block, acc)
            if MODE == 2:
                tl.store(mine + BN * BM + block, acc_u)
                tl.store(mine + 2 * BN * BM + rm, ss)
            tl.debug_barrier()  # every thread's partial stored before the count is raised
            if tl.atomic_add(count_ptr + n, 1, sem="acq_rel", scope="gpu") == SPLIT - 1:
                first = ws_ptr + (n * SPLIT).to(tl.int64) * size
                acc = tl.zeros((BN, BM), dtype=tl.float32)
                acc_u = tl.zeros((BN, BM), dtype=tl.float32)
                ss = tl.zeros((BM,), dtype=tl.float32)
                for j in range(SPLIT):
                    acc += tl.load(first + j * size + block, cache_modifier=".cg")
                    if MODE == 2:
                        acc_u += tl.load(first + j * size + BN * BM + block, cache_modifier=".cg")
                        ss += tl.load(first + j * size + 2 * BN * BM + rm, cache_modifier=".cg")
                tl.store(count_ptr + n, 0)  # zero again for the next call
                _epilogue(acc, acc_u, ss, y_ptr, sy, rn, rm, live_n, live_m, K, eps, MODE)

    @functools.cache
    def _zeroed_counts(device: torch.device, n: int) -> torch.Tensor:
        """Arrival counts of the split programs, one a tile: zero between calls (the last program of a tile zeroes
        its count), so held once per device rather than zeroed by a launch before each product (the products run
        one after another on a stream; with programmatic dependent launch a kernel touches them only after the one
        ahead of it has ended)."""
        return torch.zeros(n, dtype=torch.int32, device=device)

    def _launch(
        x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, mode: int, eps: float, tiles: Tiles, pdl: bool
    ) -> None:
        B, K = x.shape
        N = y.shape[1]
        pdl = pdl_usable(pdl, x)
        bk = max(16, tiles.bk * 2 // w.element_size())  # the same bytes a stage in float32 (shared memory)
        bm, n_tiles = max(16, _pow2(B)), triton.cdiv(N, tiles.bn)
        ks = triton.cdiv(triton.cdiv(K, tiles.split), bk) * bk  # columns a split, whole blocks
        ws, count = y, y  # not read without a split
        if tiles.split > 1:
            ws = torch.empty(n_tiles * tiles.split * tiles.bn * bm * (3 if mode == GATED else 1), dtype=torch.float32,
                             device=x.device)  # fmt: skip
            count = _zeroed_counts(x.device, max(1024, _pow2(n_tiles)))
        _skinny_kernel[(n_tiles, tiles.split)](
            x, x.stride(0), w, w.stride(0), y, y.stride(0), ws, count, B, N, K, ks, eps,
            MODE=mode, BM=bm, BN=tiles.bn, BK=bk, EVEN_K=K % bk == 0, SPLIT=tiles.split,
            IEEE=w.dtype == torch.float32 or _INTERPRET, num_warps=tiles.warps, num_stages=tiles.stages,
            **launch_options(pdl),
        )  # fmt: skip

    @torch.library.custom_op("notelab::skinny", mutates_args=("y",))
    def _skinny(
        y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, epilogue: int, eps: float, tiles: list[int], pdl: bool
    ) -> None:
        """The products as an opaque operator: a compiled graph calls it as it is and the kernel launches itself,
        with programmatic dependent launch if ``pdl`` (an option inductor does not pass on to the kernels of a
        ``triton_op``; launched by the compiled graph they measured slower at 32 rows, and at 8 with the
        attention's kernels: benchmarks/RESULTS.md, twelfth and thirteenth sessions)."""
        _launch(x, w, y, epilogue, eps, Tiles(*tiles), pdl)

    @_skinny.register_fake
    def _(y, x, w, epilogue, eps, tiles, pdl):  # noqa: ANN001, ANN202
        return None


def _product(
    x: torch.Tensor, w: torch.Tensor, n: int, epilogue: int, eps: float, tiles: Tiles, pdl: bool,
    y: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device) if y is None else y
    torch.ops.notelab.skinny(y, x, w, epilogue, eps, list(astuple(tiles)), pdl)
    return y


def _checked(name: str, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    why = skinny_unsupported(x, w)
    if why:
        raise RuntimeError(f"{name}: {why}")
    return (x if x.stride(-1) == 1 else x.contiguous()), (w if w.stride(-1) == 1 else w.contiguous())


def skinny_linear(x: torch.Tensor, w: torch.Tensor, tiles: Tiles = LINEAR_TILES, pdl: bool = True) -> torch.Tensor:
    """``x w^T`` (``x`` ``(B, K)``, ``w`` ``(N, K)``, B <= 64) by the kernel above; ``pdl``: launched before the
    kernel ahead of it ends (programmatic dependent launch, sm_90+, else as usual), waiting for it before reading
    anything."""
    x, w = _checked("skinny_linear", x, w)
    return _product(x, w, w.shape[0], PLAIN, 0.0, tiles, pdl)


def skinny_add_(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, tiles: Tiles = ADD_TILES, pdl: bool = True) -> None:
    """``y <- y + x w^T`` in place (``y`` ``(B, N)`` with unit stride along a row), rounded once."""
    x, w = _checked("skinny_add_", x, w)
    if y.shape != (x.shape[0], w.shape[0]) or y.stride(-1) != 1 or y.dtype != x.dtype:
        raise RuntimeError(f"skinny_add_: expected y {(x.shape[0], w.shape[0])} of {x.dtype}, unit stride; "
                           f"got {tuple(y.shape)} of {y.dtype}, strides {y.stride()}")  # fmt: skip
    _product(x, w, w.shape[0], ACCUMULATE, 0.0, tiles, pdl, y)


def skinny_gated(
    x: torch.Tensor, w: torch.Tensor, eps: float, tiles: Tiles = GATED_TILES, pdl: bool = True
) -> torch.Tensor:
    """``silu(r g) * (r u)`` with ``[g; u] = x w^T`` (``w`` ``(2I, K)``: [W_g; W_u]) and r = 1 / sqrt(mean(x^2) +
    eps) per row: ``notelab.lm.folded.gated_silu_torch(F.linear(x, w), x, eps)`` in one kernel, ``(B, I)``."""
    x, w = _checked("skinny_gated", x, w)
    if w.shape[0] % 2:
        raise RuntimeError(f"skinny_gated: expected an even number of weight rows ([W_g; W_u]), got {w.shape[0]}")
    return _product(x, w, w.shape[0] // 2, GATED, float(eps), tiles, pdl)
