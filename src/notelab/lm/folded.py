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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from notelab.core.norms import RMSNorm, rms_scale
from notelab.lm.model import FusedWeights, Llama, decode_inputs, split_qkv
from notelab.lm.triton_env import INTERPRET as _INTERPRET  # noqa: F401 - the tests read it here
from notelab.lm.triton_env import kernels_unsupported, prefetch_lines, tl, triton
from notelab.lm.triton_env import pow2 as _pow2

if triton is not None:
    from notelab.lm.triton_env import l2_prefetch

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
    return model.unplain_reason()


@torch.no_grad()
def folded_weights(model: Llama, out: FusedWeights | None = None) -> FusedWeights:
    """Per layer ``[W_q; W_k; W_v] diag g_in`` and ``[W_gate; W_up] diag g_post`` (g the RMSNorms' gains), rounded
    to the weights' dtype; ``out`` (an earlier result) is refilled in place (captured graphs read it)."""
    stacked = model.fused_decode_weights(out)
    for layer, (w_qkv, w_gate_up) in zip(model.layers, stacked, strict=True):
        for w, norm in ((w_qkv, layer.input_layernorm), (w_gate_up, layer.post_attention_layernorm)):
            w.copy_(w.float() * norm.weight.float())
    return stacked


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

    @triton.jit
    def _gated_silu_kernel(  # noqa: ANN202
        gu_ptr, sgu, x_ptr, sx, out_ptr, I, D, eps, pa_ptr, pa_lines, pb_ptr, pb_lines,  # noqa: ANN001
        DP2: tl.constexpr, BLOCK: tl.constexpr, PREFETCH: tl.constexpr,
    ):  # fmt: skip
        c, b = tl.program_id(0), tl.program_id(1)
        if PREFETCH:  # the down product's weights (and the next layer's), asked of L2 first
            pid, nprog = c + tl.num_programs(0) * b, tl.num_programs(0) * tl.num_programs(1)
            l2_prefetch(pa_ptr, pa_lines, pid, nprog)
            l2_prefetch(pb_ptr, pb_lines, pid, nprog)
        d = tl.arange(0, DP2)
        xr = tl.load(x_ptr + b.to(tl.int64) * sx + d, mask=d < D, other=0.0).to(tl.float32)
        r = tl.math.rsqrt(tl.sum(xr * xr, 0) / D + eps)
        offs = c * BLOCK + tl.arange(0, BLOCK)
        inside = offs < I
        row = gu_ptr + b.to(tl.int64) * sgu
        gate = tl.load(row + offs, mask=inside, other=0.0)
        dt = gate.dtype
        gate = (gate.to(tl.float32) * r).to(dt).to(tl.float32)
        up = (tl.load(row + I + offs, mask=inside, other=0.0).to(tl.float32) * r).to(dt).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)  # F.silu, rounded
        tl.store(out_ptr + b.to(tl.int64) * I + offs, (act * up).to(dt), mask=inside)

    def _launch_silu(
        wrap: Callable, gate_up: torch.Tensor, x: torch.Tensor, eps: float, prefetch: list, prefetch_bytes: list[int]
    ) -> torch.Tensor:
        B, I2 = gate_up.shape
        out = torch.empty(B, I2 // 2, dtype=gate_up.dtype, device=gate_up.device)
        (pa, pb), (na, nb) = prefetch_lines(prefetch, prefetch_bytes, gate_up)
        wrap(_gated_silu_kernel)[(-(-(I2 // 2) // BLOCK), B)](
            gate_up, gate_up.stride(0), x, x.stride(0), out, I2 // 2, x.shape[1], eps, pa, na, pb, nb,
            DP2=max(2, _pow2(x.shape[1])), BLOCK=BLOCK, PREFETCH=na + nb > 0,
        )  # fmt: skip
        return out

    @torch.library.triton_op("notelab::gated_silu", mutates_args=())
    def _gated_silu(gate_up: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
        return _launch_silu(torch.library.wrap_triton, gate_up, x, eps, [], [])

    @torch.library.custom_op("notelab::gated_silu_ahead", mutates_args=())
    def _gated_silu_ahead(
        gate_up: torch.Tensor, x: torch.Tensor, eps: float, prefetch: list[torch.Tensor], prefetch_bytes: list[int]
    ) -> torch.Tensor:
        """With L2 prefetch requests: an operator inductor does not see into (as
        ``notelab.lm.attend.rope_attention``'s)."""
        return _launch_silu(lambda kernel: kernel, gate_up, x, eps, prefetch, prefetch_bytes)

    @_gated_silu_ahead.register_fake
    def _(gate_up: torch.Tensor, *args) -> torch.Tensor:  # noqa: ANN002
        return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)


def gated_silu(
    gate_up: torch.Tensor, x: torch.Tensor, eps: float, prefetch: Sequence[tuple[torch.Tensor, int]] = ()
) -> torch.Tensor:
    """:func:`gated_silu_torch` in one Triton kernel where the kernels run (CUDA, or Triton's interpreter), else
    the torch function. ``prefetch``: at most two (tensor, bytes from its start) regions the kernel asks L2 to
    fetch for the products after it (``notelab.lm.triton_env.l2_prefetch``; a hint: the result is the same)."""
    if kernels_unsupported(gate_up):
        return gated_silu_torch(gate_up, x, eps)
    rows = [t if t.stride(-1) == 1 else t.contiguous() for t in (gate_up, x)]
    if prefetch:
        regions = [t for t, _ in prefetch], [int(n) for _, n in prefetch]
        return torch.ops.notelab.gated_silu_ahead(*rows, float(eps), *regions)
    return torch.ops.notelab.gated_silu(*rows, float(eps))


@dataclass(frozen=True)
class Prefetch:
    """Which weights the folded step's kernels ask L2 to fetch ahead, as shares of each matrix from its start: the
    attention kernel (after [q; k; v]) fetches ``o`` of W_o and ``gate_up`` of [W_gate; W_up]; the SiLU product
    (after [gate; up]) ``down`` of W_down and ``next_qkv`` of the next layer's [W_q; W_k; W_v]. A decode step of
    8-32 rows reads every weight once; its attention and SiLU kernels read little, so the memory bus idles there
    while the products after them wait for their weights (``notelab.lm.triton_env.l2_prefetch``)."""

    o: float = 1.0
    gate_up: float = 0.25
    down: float = 0.25
    next_qkv: float = 0.0


def _share(w: torch.Tensor, share: float) -> list[tuple[torch.Tensor, int]]:
    n = int(share * w.numel() * w.element_size())
    return [(w, n)] if n > 0 else []


def folded_forward(
    model: Llama,
    folded: FusedWeights,
    tok: torch.Tensor,
    pos: torch.Tensor,
    cache: nn.ModuleList,
    attention: Callable[..., torch.Tensor],
    prefetch: Prefetch | None = None,
) -> torch.Tensor:
    """``Llama._forward`` for one token a row (``tok`` ``(B, 1)`` at cache slots ``pos`` ``(B,)``) over the folded
    weights of :func:`folded_weights`: logits ``(B, 1, V)``. ``attention(q, k, v, cache, pos, rope, norm=(x, eps))``
    as ``notelab.lm.engine.rotated_attention``; with ``prefetch`` (:class:`Prefetch`) it is also passed
    ``prefetch=`` regions, as ``notelab.lm.attend.rope_attention`` takes them."""
    B = tok.shape[0]
    x, rope = decode_inputs(model, tok, pos)
    x = x.reshape(B, -1)  # the residual rows, updated in place by the products
    n = len(model.layers)
    for i, (layer, (w_qkv, w_gate_up)) in enumerate(zip(model.layers, folded, strict=True)):
        a = layer.self_attn
        w_o, w_down = a.o_proj.weight, layer.mlp.down_proj.weight
        q, k, v = split_qkv(F.linear(x, w_qkv), a)
        ahead = {}
        if prefetch is not None:
            ahead = dict(prefetch=_share(w_o, prefetch.o) + _share(w_gate_up, prefetch.gate_up))
        y = attention(q, k, v, cache[i], pos, rope, norm=(x, layer.input_layernorm.eps), **ahead)
        # (under autocast the products' outputs are of its dtype: the residual rows keep theirs)
        add_linear_(x, y.transpose(1, 2).reshape(B, -1).to(x.dtype), w_o.to(x.dtype))
        ahead = []
        if prefetch is not None:
            ahead = _share(w_down, prefetch.down) + (_share(folded[i + 1][0], prefetch.next_qkv) if i + 1 < n else [])
        act = gated_silu(F.linear(x, w_gate_up), x, layer.post_attention_layernorm.eps, ahead)
        add_linear_(x, act.to(x.dtype), w_down.to(x.dtype))
    return model.lm_head(model.norm(x))[:, None]
