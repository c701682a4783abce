"""The batched decode step with each RMSNorm folded into the projection after it: fewer kernels a layer.

A Llama layer computes ``h = RMSNorm(x) = r(x) x * g`` with ``r(x) = 1 / sqrt(mean(x^2) + eps)`` a number per row
(Zhang & Sennrich 2019), then ``h W^T``. Since ``r`` is a scalar per row and ``g`` a gain per input column,

    RMSNorm(x) W^T = r(x) (x (W diag g)^T),

so with ``W' = W diag g`` stored once (the stacked copies the engine keeps anyway) the product reads the residual
row ``x`` itself, and ``r(x)`` is applied by whatever reads the product's output: the attention kernel for
``[q; k; v]`` (``notelab.lm.attend.rope_attention(norm=...)``), :func:`gated_silu` for ``[gate; up]``. The
residual additions become the products' own accumulation (``x <- x + y W_o^T``, ``x <- x + a W_down^T``: one
cuBLAS call each, :func:`add_linear_`). A layer is then [q; k; v], attention (two kernels), o, [gate; up], SiLU
product, down: no RMSNorm kernels and no residual additions (the torch step of ``notelab.lm.engine`` has both
twice a layer, each a launch at batch 8-32, where a decode step is bound by launches and weight reads). The
products round where the unfolded ones round: ``x W'^T`` to the activation dtype, then ``r`` times it again;
the same arithmetic up to those roundings (``tests/lm/test_folded.py`` checks the tokens in float32).

Which kernels compute the products is injected (:class:`Products`): ``CUBLAS`` as above, or ``SKINNY``, the
default, every product by ``notelab.lm.skinny``'s kernel: [gate; up] with the SiLU product in its epilogue (one
kernel instead of two), o and down (cut into parts over K) accumulating into the residual, [q; k; v] and the
output projection, each launched with programmatic dependent launch (it may start before the kernel ahead of it
ends; the attention's kernels too at up to ``notelab.lm.triton_env.PDL_MAX_ROWS`` rows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from notelab.core.norms import RMSNorm, rms_scale
from notelab.lm.model import FusedWeights, Llama, decode_inputs, split_qkv
from notelab.lm.skinny import (
    ADD_TILES,
    DOWN_TILES,
    QKV_TILES,
    skinny_add_,
    skinny_gated,
    skinny_linear,
    skinny_unsupported,
)
from notelab.lm.triton_env import INTERPRET as _INTERPRET  # noqa: F401 - the tests read it here
from notelab.lm.triton_env import kernels_unsupported, tl, triton
from notelab.lm.triton_env import pow2 as _pow2

BLOCK = 1024  # outputs of the SiLU product a program writes


def folded_unsupported(model: Llama) -> str:
    """Why :func:`folded_forward` cannot run ``model`` ("" when it can): RMSNorms, bias-free SwiGLU and projections."""
    for i, layer in enumerate(model.layers):
        a, m = layer.self_attn, layer.mlp
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if not all(type(n) is RMSNorm for n in norms):
            return f"layers.{i}: the norms are not RMSNorm"
        if not hasattr(m, "gate_proj"):
            return f"layers.{i}.mlp is not a SwiGLU"
        linears = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)
        if any(getattr(p, "bias", None) is not None for p in linears):
            return f"layers.{i}: a projection has a bias"
    if getattr(model.lm_head, "bias", None) is not None:
        return "lm_head has a bias"
    return model.unplain_reason()


@torch.no_grad()
def folded_weights(model: Llama, out: FusedWeights | None = None) -> FusedWeights:
    """Per layer ``[W_q; W_k; W_v] diag g_in`` and ``[W_gate; W_up] diag g_post`` (g the RMSNorms' gains), rounded
    to the weights' dtype once (the product of two bf16 / fp16 numbers is exact in the float32 torch computes it
    in); ``out`` (an earlier result) is refilled in place (captured graphs read it): one pass over the weights,
    no temporaries (``generate`` refreshes them at every call)."""
    if out is None:
        out = model.fused_decode_weights()
    for layer, (w_qkv, w_gate_up) in zip(model.layers, out, strict=True):
        a, m = layer.self_attn, layer.mlp
        for w, parts, norm in (
            (w_qkv, (a.q_proj, a.k_proj, a.v_proj), layer.input_layernorm),
            (w_gate_up, (m.gate_proj, m.up_proj), layer.post_attention_layernorm),
        ):
            for rows, p in zip(w.split([p.weight.shape[0] for p in parts]), parts, strict=True):
                torch.mul(p.weight, norm.weight, out=rows)
    return out


@torch.library.custom_op("notelab::add_linear_", mutates_args=("x",))
def add_linear_(x: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> None:
    """``x <- x + a w^T`` in place, one product accumulating into ``x`` (cuBLAS's beta = 1 on CUDA)."""
    x.addmm_(a, w.t())


@add_linear_.register_fake
def _(x: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> None:
    return None


def gated_silu_torch(gate_up: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """``silu(r gate) * (r up)`` with ``[gate; up] = gate_up`` ``(B, 2I)`` and r = 1 / sqrt(mean(x^2) + eps) of the
    rows ``x`` ``(B, dim)``; each factor rounded to the input dtype as the unfolded layer rounds it."""
    r = rms_scale(x, eps)
    gate, up = (gate_up.float() * r).to(gate_up.dtype).chunk(2, dim=-1)
    return F.silu(gate) * up


if triton is not None:
    from notelab.lm.skinny import swiglu_rounded as _swiglu_rounded

    @triton.jit
    def _gated_silu_kernel(gu_ptr, sgu, x_ptr, sx, out_ptr, I, D, eps, DP2: tl.constexpr, BLOCK: tl.constexpr):  # noqa: ANN001, ANN202
        c, b = tl.program_id(0), tl.program_id(1)
        d = tl.arange(0, DP2)
        xr = tl.load(x_ptr + b.to(tl.int64) * sx + d, mask=d < D, other=0.0).to(tl.float32)
        r = tl.math.rsqrt(tl.sum(xr * xr, 0) / D + eps)
        offs = c * BLOCK + tl.arange(0, BLOCK)
        inside = offs < I
        row = gu_ptr + b.to(tl.int64) * sgu
        gate = tl.load(row + offs, mask=inside, other=0.0)
        up = tl.load(row + I + offs, mask=inside, other=0.0)
        out = _swiglu_rounded(gate.to(tl.float32), up.to(tl.float32), r, gate.dtype)
        tl.store(out_ptr + b.to(tl.int64) * I + offs, out.to(gate.dtype), mask=inside)

    @torch.library.triton_op("notelab::gated_silu", mutates_args=())
    def _gated_silu(gate_up: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
        B, I2 = gate_up.shape
        out = torch.empty(B, I2 // 2, dtype=gate_up.dtype, device=gate_up.device)
        torch.library.wrap_triton(_gated_silu_kernel)[(-(-(I2 // 2) // BLOCK), B)](
            gate_up, gate_up.stride(0), x, x.stride(0), out, I2 // 2, x.shape[1], eps,
            DP2=max(2, _pow2(x.shape[1])), BLOCK=BLOCK,
        )  # fmt: skip
        return out


def gated_silu(gate_up: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`gated_silu_torch` in one Triton kernel where the kernels run (CUDA, or Triton's interpreter), else
    the torch function."""
    if kernels_unsupported(gate_up):
        return gated_silu_torch(gate_up, x, eps)
    rows = (t if t.stride(-1) == 1 else t.contiguous() for t in (gate_up, x))
    return torch.ops.notelab.gated_silu(*rows, float(eps))


def gated_linear(x: torch.Tensor, w_gate_up: torch.Tensor, eps: float) -> torch.Tensor:
    """The folded SwiGLU's activation ``(B, I)``: :func:`gated_silu` of ``x [W_g; W_u]^T`` (cuBLAS, then one kernel)."""
    return gated_silu(F.linear(x, w_gate_up), x, eps)


@dataclass(frozen=True)
class Products:
    """How the folded step multiplies its rows by the weights: ``linear(x, w)`` = x w^T, ``add_(y, x, w)``:
    y <- y + x w^T in place (the residual), ``gated(x, w_gate_up, eps)``: :func:`gated_silu_torch` of x w_gate_up^T
    and x; ``head(x, w)``: the output projection of the final-normed rows."""

    linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    add_: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]
    gated: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    head: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # the output projection: x W^T, 128,256 wide


CUBLAS = Products(F.linear, add_linear_, gated_linear, F.linear)
WIDE_K = 4096  # a residual product wider than this (down: 8,192) is cut into parts over K (skinny.DOWN_TILES)


def skinny_qkv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x w^T`` for [q; k; v] by ``notelab.lm.skinny`` (alone 7.3-7.8 us against cuBLAS's 6.7-7.0 at 8-32 rows,
    but in the step with the other products' kernels it measured faster: benchmarks/RESULTS.md, twelfth
    session), or by cuBLAS where the kernel cannot run."""
    return F.linear(x, w) if skinny_unsupported(x, w) else skinny_linear(x, w, QKV_TILES)


def residual_add_(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """``y <- y + x w^T`` by ``notelab.lm.skinny``'s kernel (o: 5.8-6.1 us against cuBLAS's 6.3 at 8-32 rows;
    down, 8,192 wide, cut into four parts over K: 13.2-14.0 against 14.0-14.3), by cuBLAS where it cannot run."""
    if skinny_unsupported(x, w):
        add_linear_(y, x, w)
    else:
        skinny_add_(y, x, w, DOWN_TILES if w.shape[1] > WIDE_K else ADD_TILES)


def skinny_gated_linear(x: torch.Tensor, w_gate_up: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`gated_linear` in one ``notelab.lm.skinny`` kernel (the SiLU product its epilogue: 18.8-19.9 us
    against 21.3-21.7 for cuBLAS and the SiLU kernel), or as is where the kernel cannot run."""
    if skinny_unsupported(x, w_gate_up):
        return gated_linear(x, w_gate_up, eps)
    return skinny_gated(x, w_gate_up, eps)


def skinny_head(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The output projection ``x w^T`` by ``notelab.lm.skinny`` (126.6-136.1 us against cuBLAS's 131.6-138.8 for
    the Llama 3 vocabulary at 8-32 rows), or by cuBLAS where the kernel cannot run."""
    return F.linear(x, w) if skinny_unsupported(x, w) else skinny_linear(x, w)


# The folded step's products: every one by the skinny kernel (with programmatic dependent launch), cuBLAS where it
# cannot run
SKINNY = Products(skinny_qkv, residual_add_, skinny_gated_linear, skinny_head)


def folded_forward(
    model: Llama,
    folded: FusedWeights,
    tok: torch.Tensor,
    pos: torch.Tensor,
    cache: nn.ModuleList,
    attention: Callable[..., torch.Tensor],
    products: Products = SKINNY,
) -> torch.Tensor:
    """``Llama._forward`` for one token a row (``tok`` ``(B, 1)`` at cache slots ``pos`` ``(B,)``) over the folded
    weights of :func:`folded_weights`: logits ``(B, 1, V)``. ``attention(q, k, v, cache, pos, rope, norm=(x, eps))``
    as ``notelab.lm.engine.rotated_attention``; ``products`` the products' kernels."""
    B = tok.shape[0]
    x, rope = decode_inputs(model, tok, pos)
    x = x.reshape(B, -1)  # the residual rows, updated in place by the products
    for i, (layer, (w_qkv, w_gate_up)) in enumerate(zip(model.layers, folded, strict=True)):
        a = layer.self_attn
        q, k, v = split_qkv(products.linear(x, w_qkv), a)
        y = attention(q, k, v, cache[i], pos, rope, norm=(x, layer.input_layernorm.eps))
        # (under autocast the products' outputs are of its dtype: the residual rows keep theirs)
        products.add_(x, y.transpose(1, 2).reshape(B, -1).to(x.dtype), a.o_proj.weight.to(x.dtype))
        act = products.gated(x, w_gate_up, layer.post_attention_layernorm.eps)
        products.add_(x, act.to(x.dtype), layer.mlp.down_proj.weight.to(x.dtype))
    return products.head(model.norm(x), model.lm_head.weight)[:, None]
