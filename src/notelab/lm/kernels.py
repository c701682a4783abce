"""Fused matrix-vector products for batch-1 decoding: the elementwise work around a projection, in its kernel.

For a few input rows x (M = batch x new tokens, 1..8) and a row-major weight W of shape (N, K):

    y = W RMSNorm(x)      (+ r)    RMSNorm(x) = x / sqrt(mean(x^2) + eps) * gamma          (qkv, gate_up)
    y = W (SiLU(g) * u)   (+ r)    x = [g | u] of width 2K, SiLU(g) = g * sigmoid(g)       (down_proj)
    y = W x               (+ r)                                                            (o_proj)

W x accumulated in float32 and rounded once to x's dtype, then the residual r (M, N) added; the input
transform computed in float32 and rounded to x's dtype where the unfused torch sequence rounds
(``notelab.core.norms.RMSNorm``, ``F.silu(g) * u``, ``F.linear``, ``+ r``), so the results agree to the
summation order.

Why: batch-1 decoding is bound by reading the weights. Every weight byte is read once per token, and
the matrix-vector product itself is memory traffic, nothing else; the norms, the SiLU * up and the
residual adds around it are separate kernels whose launches and ramp-up/tail time (a few us each on a
kernel that should take 2-16 us) are pure overhead. Here the input transform happens on the fly on the
small input chunk each program loads next to its weight tile, and the residual add in the epilogue,
so each projection is ONE kernel that streams its weights once.

Kernel (``_fused_matvec_kernel``): grid (cdiv(N, BLOCK_N), M). A program owns BLOCK_N output rows of
one input row m; for RMSNorm it first computes that row's 1/rms by a loop over x (K elements, tiny,
L2-resident), then loops over K in BLOCK_K chunks: load the (BLOCK_N, BLOCK_K) weight tile and the
matching input chunk, transform the chunk in float32 (rounding to x's dtype where torch's unfused
ops round), multiply-accumulate into a float32 (BLOCK_N, BLOCK_K) register tile that is reduced over
K once at the end, add the residual, store in x's dtype. Block sizes come from ``triton.autotune``,
keyed on N, K and the mode. With M > 1 each input row re-reads W (from L2 where it fits): the design
targets M = 1.

``fused_matvec`` is registered as the custom op ``notelab::fused_matvec`` through
``torch.library.triton_op`` + ``wrap_triton`` (torch >= 2.6), so ``torch.compile(fullgraph=True)``
sees the kernel and CUDA graphs can capture it (autotune first, outside the capture). Without triton,
or on CPU tensors outside Triton's interpreter (``TRITON_INTERPRET=1``), it runs
``fused_matvec_reference``, the pure-torch definition of the same math. Inference only (no autograd).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

from notelab.core.errors import ConfigError, ShapeError
from notelab.core.norms import rms_norm

try:  # triton is optional: this module imports (and falls back to torch) without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

__all__ = ["OP_NAME", "fused_matvec", "fused_matvec_reference", "last_autotune_config", "triton_available"]

OP_NAME = "notelab::fused_matvec"
# The interpreter mode is fixed when the kernel is defined (triton.jit reads TRITON_INTERPRET then).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_MODE_PLAIN, _MODE_NORM, _MODE_SILU = 0, 1, 2
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_available() -> bool:
    """True when the Triton kernel can run here: triton imports and CUDA is available, or TRITON_INTERPRET=1.

    TRITON_INTERPRET is read once, when this module is imported (``triton.jit`` fixes the mode then).
    """
    return triton is not None and (_INTERPRET or torch.cuda.is_available())


def last_autotune_config() -> str | None:
    """The block sizes / warps / stages of the most recent eager launch (None before one, or without triton)."""
    cfg = getattr(_fused_matvec_tuned, "best_config", None) if triton is not None else None
    return None if cfg is None else str(cfg)


# ----------------------------------------------------------------------------------------------------------------
# The definition in torch: test oracle and CPU fallback.


def _check_mode_and_shapes(
    x: torch.Tensor,
    w: torch.Tensor,
    norm_weight: torch.Tensor | None,
    silu_mul: bool,
    residual: torch.Tensor | None,
) -> tuple[int, int, int]:
    """Validate the mode and the shapes; returns (M, N, K)."""
    if norm_weight is not None and silu_mul:
        raise ConfigError("norm_weight and silu_mul are exclusive: set at most one of norm_weight / silu_mul")
    if w.dim() != 2:
        raise ShapeError(f"w: expected a 2-D (N, K) weight, got shape {tuple(w.shape)}")
    N, K = w.shape
    if K == 0:
        raise ShapeError(f"w: expected K >= 1 columns, got shape {tuple(w.shape)}")
    kx = 2 * K if silu_mul else K
    want = f"(M, {kx})" + (" = (M, 2 * w.shape[1]) for silu_mul's [gate | up]" if silu_mul else "")
    if x.dim() != 2 or x.shape[1] != kx:
        raise ShapeError(f"x: expected shape {want}, got {tuple(x.shape)}")
    M = x.shape[0]
    if norm_weight is not None and tuple(norm_weight.shape) != (K,):
        raise ShapeError(f"norm_weight: expected shape ({K},), got {tuple(norm_weight.shape)}")
    if residual is not None and tuple(residual.shape) != (M, N):
        raise ShapeError(f"residual: expected shape ({M}, {N}), got {tuple(residual.shape)}")
    return M, N, K


def fused_matvec_reference(
    x: torch.Tensor,
    w: torch.Tensor,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    silu_mul: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``inp @ w.T`` (+ residual) in torch, with inp = RMSNorm(x), SiLU(gate) * up or x.

    x: (M, K), or (M, 2K) = [gate | up] with ``silu_mul``; w: (N, K); norm_weight: (K,); residual: (M, N).
    The RMSNorm is ``notelab.core.norms.rms_norm``; the product is accumulated in float32
    and rounded to x's dtype, then the residual is added (as ``F.linear(...) + residual`` does).
    """
    _check_mode_and_shapes(x, w, norm_weight, silu_mul, residual)
    if norm_weight is not None:
        inp = rms_norm(x, norm_weight, eps)
    elif silu_mul:
        gate, up = x.chunk(2, dim=-1)
        inp = F.silu(gate) * up
    else:
        inp = x
    y = (inp.float() @ w.float().T).to(x.dtype)
    return y if residual is None else residual + y


# ----------------------------------------------------------------------------------------------------------------
# The Triton kernel.

# (BLOCK_N, BLOCK_K, num_warps, num_stages). Short on purpose: eager autotuning benchmarks every entry once
# per (N, K, mode, dtypes). Small BLOCK_N gives more programs (N = 2048 / 8 = 256 programs for 132 SMs);
# large BLOCK_K gives long contiguous row reads (512 bf16 = 1 KiB per row per step).
_CONFIG_TABLE = (
    (4, 512, 4, 2),
    (4, 256, 2, 4),
    (8, 256, 4, 3),
    (8, 512, 4, 2),
    (8, 512, 8, 2),
    (16, 128, 2, 4),
    (16, 256, 4, 2),
    (16, 512, 4, 1),
    (16, 512, 8, 2),
    (32, 128, 4, 3),
    (32, 256, 8, 2),
    (32, 512, 8, 1),
)

if triton is not None:

    @triton.jit
    def _fused_matvec_kernel(  # noqa: ANN202  (a Triton kernel returns nothing; its signature is parsed by triton)
        x_ptr,  # noqa: ANN001  (M, K) or (M, 2K), contiguous
        w_ptr,  # noqa: ANN001  (N, K), contiguous
        nw_ptr,  # noqa: ANN001  (K,) RMSNorm weight (MODE 1; any pointer otherwise)
        res_ptr,  # noqa: ANN001  (M, N) residual (HAS_RESIDUAL; any pointer otherwise)
        out_ptr,  # noqa: ANN001  (M, N), x's dtype
        N,  # noqa: ANN001
        K,  # noqa: ANN001
        eps,  # noqa: ANN001
        MODE: tl.constexpr,  # 0 plain, 1 RMSNorm, 2 SiLU(gate) * up
        HAS_RESIDUAL: tl.constexpr,
        ROUND_NORM: tl.constexpr,  # round RMSNorm's `* g` to x's dtype (torch does when g's dtype is x's)
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        row = tl.program_id(1).to(tl.int64)
        x_dtype = x_ptr.dtype.element_ty
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_k0 = tl.arange(0, BLOCK_K)
        if MODE == 2:
            x_row = x_ptr + row * (2 * K)
        else:
            x_row = x_ptr + row * K

        if MODE == 1:  # 1 / rms of this row, in float32, before the main loop (x is tiny and L2-resident)
            sq = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + offs_k0
                xv = tl.load(x_row + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
                sq += xv * xv
            rstd = tl.math.rsqrt(tl.sum(sq, axis=0) / K + eps)

        w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * K
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + offs_k0
            mask_k = offs_k < K
            if MODE == 1:
                xv = tl.load(x_row + offs_k, mask=mask_k, other=0.0).to(tl.float32)
                g = tl.load(nw_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
                inp = (xv * rstd).to(x_dtype).to(tl.float32) * g
                if ROUND_NORM:
                    inp = inp.to(x_dtype).to(tl.float32)
            elif MODE == 2:
                gate = tl.load(x_row + offs_k, mask=mask_k, other=0.0).to(tl.float32)
                up = tl.load(x_row + K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
                act = (gate * tl.sigmoid(gate)).to(x_dtype).to(tl.float32)
                inp = (act * up).to(x_dtype).to(tl.float32)
            else:
                inp = tl.load(x_row + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            wt = tl.load(
                w_rows + offs_k[None, :],
                mask=mask_n[:, None] & mask_k[None, :],
                other=0.0,
                eviction_policy="evict_first",  # each weight is read once per token: keep x, not W, in cache
            )
            acc += wt.to(tl.float32) * inp[None, :]

        y = tl.sum(acc, axis=1).to(x_dtype)
        out_offs = row * N + offs_n
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + out_offs, mask=mask_n, other=0.0).to(tl.float32)
            y = (y.to(tl.float32) + r).to(x_dtype)
        tl.store(out_ptr + out_offs, y, mask=mask_n)

    def _interpreter_config(configs: list, named_args: dict, **kwargs: Any) -> list:
        """Under TRITON_INTERPRET there is nothing to time: keep the config with the smallest tile."""
        return [min(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]

    _fused_matvec_tuned = triton.autotune(
        configs=[
            triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=nw, num_stages=ns)
            for bn, bk, nw, ns in _CONFIG_TABLE
        ],
        key=["N", "K", "MODE", "HAS_RESIDUAL"],
        prune_configs_by={"early_config_prune": _interpreter_config} if _INTERPRET else None,
    )(_fused_matvec_kernel)


def _launch_args(
    x: torch.Tensor,
    w: torch.Tensor,
    norm_weight: torch.Tensor | None,
    eps: float,
    silu_mul: bool,
    residual: torch.Tensor | None,
) -> tuple[torch.Tensor, tuple, dict[str, Any]]:
    """Output tensor, positional and constexpr arguments of one launch (the grid needs BLOCK_N)."""
    M, N = x.shape[0], w.shape[0]
    K = w.shape[1]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    mode = _MODE_NORM if norm_weight is not None else _MODE_SILU if silu_mul else _MODE_PLAIN
    round_norm = norm_weight is not None and torch.promote_types(x.dtype, norm_weight.dtype) == x.dtype
    args = (x, w, x if norm_weight is None else norm_weight, x if residual is None else residual, out, N, K, eps)
    meta = {"MODE": mode, "HAS_RESIDUAL": residual is not None, "ROUND_NORM": round_norm}
    return out, args, meta


def _fused_matvec_impl(
    x: torch.Tensor,
    w: torch.Tensor,
    norm_weight: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    silu_mul: bool,
) -> torch.Tensor:
    """The op's body: one launch of the autotuned kernel. Inputs are validated by ``fused_matvec``."""
    out, args, meta = _launch_args(x, w, norm_weight, eps, silu_mul, residual)
    M, N = out.shape
    if M == 0 or N == 0:
        return out

    def grid(cfg: dict[str, Any]) -> tuple[int, int]:
        return (triton.cdiv(N, cfg["BLOCK_N"]), M)

    _wrap_triton(_fused_matvec_tuned)[grid](*args, **meta)
    return out


def _wrap_triton(kernel: Any) -> Any:
    wrap = getattr(torch.library, "wrap_triton", None)
    return kernel if wrap is None else wrap(kernel)


# The custom op: torch.compile traces into a triton_op (it sees the kernel, not an opaque call).
_HAS_OP = triton is not None and hasattr(torch.library, "triton_op")
if _HAS_OP:
    torch.library.triton_op(OP_NAME, _fused_matvec_impl, mutates_args=())


def _launch_config(
    x: torch.Tensor,
    w: torch.Tensor,
    *,
    block_n: int,
    block_k: int,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    silu_mul: bool = False,
    residual: torch.Tensor | None = None,
    num_warps: int = 4,
) -> torch.Tensor:
    """The kernel at a fixed tile size, without autotuning or the custom op (for tests of the tiling)."""
    _check_fused_inputs(x, w, norm_weight, silu_mul, residual)
    out, args, meta = _launch_args(x, w, norm_weight, eps, silu_mul, residual)
    grid = (triton.cdiv(out.shape[1], block_n), out.shape[0])
    _fused_matvec_kernel[grid](*args, **meta, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Public entry point.


def _check_fused_inputs(
    x: torch.Tensor,
    w: torch.Tensor,
    norm_weight: torch.Tensor | None,
    silu_mul: bool,
    residual: torch.Tensor | None,
) -> None:
    """Shapes as the reference, plus what the kernel assumes: contiguous float tensors on one device."""
    _check_mode_and_shapes(x, w, norm_weight, silu_mul, residual)
    named = {"x": x, "w": w, "norm_weight": norm_weight, "residual": residual}
    for name, t in named.items():
        if t is None:
            continue
        if t.dtype not in _FLOAT_DTYPES:
            raise ShapeError(f"{name}: expected float32, float16 or bfloat16, got {t.dtype}")
        if t.device != x.device:
            raise ShapeError(f"{name}: expected a tensor on x's device {x.device}, got {t.device}")
        if name != "norm_weight" and not t.is_contiguous():
            raise ShapeError(
                f"{name}: expected a contiguous tensor, got shape {tuple(t.shape)} with strides {t.stride()}"
                " (call .contiguous() first)"
            )
    if norm_weight is not None and not norm_weight.is_contiguous():
        raise ShapeError(f"norm_weight: expected a contiguous tensor, got strides {norm_weight.stride()}")
    if residual is not None and residual.dtype != x.dtype:
        raise ShapeError(f"residual: expected x's dtype {x.dtype}, got {residual.dtype}")


def fused_matvec(
    x: torch.Tensor,
    w: torch.Tensor,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    silu_mul: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``fused_matvec_reference``'s result from one Triton kernel launch (the ``notelab::fused_matvec`` op).

    x: (M, K) (M small: 1..8 rows), or (M, 2K) = [gate | up] with ``silu_mul``; w: (N, K); norm_weight
    (K,) applies RMSNorm with ``eps`` to x first; residual (M, N) is added to the result. x, w and
    residual must be contiguous. Falls back to the reference where the kernel cannot run (no triton, or
    CPU tensors outside TRITON_INTERPRET=1). Errors: ConfigError (a ValueError) when both norm_weight and
    silu_mul are set; ShapeError (a ValueError) on a wrong shape, dtype, device or layout.
    """
    _check_fused_inputs(x, w, norm_weight, silu_mul, residual)
    if triton is None or not (x.is_cuda or _INTERPRET):
        return fused_matvec_reference(x, w, norm_weight=norm_weight, eps=eps, silu_mul=silu_mul, residual=residual)
    if not _HAS_OP:  # torch < 2.6: the kernel without the op (not traceable by torch.compile)
        return _fused_matvec_impl(x, w, norm_weight, residual, float(eps), bool(silu_mul))
    return torch.ops.notelab.fused_matvec.default(x, w, norm_weight, residual, float(eps), bool(silu_mul))
