"""notelab.lm.kernels: the fused matrix-vector kernel, run on CPU through Triton's interpreter.

The interpreter needs TRITON_INTERPRET=1 when triton itself is first imported (its library functions,
``tl.zeros``, ``tl.sum``..., are built for the interpreter then), when the kernel module is imported
(``triton.jit``) and while a kernel runs. So this module sets it before importing anything that imports
triton, and for each kernel test, and puts it back in between, so that other tests in the same worker see
the environment they expect. Where another test module imported triton first (``diffusers`` does, in a
full run), the kernel tests cannot run in this process: they skip here and
``test_kernel_tests_in_a_fresh_process`` runs this file in a child process that sets the variable from the
start. Without triton the kernel tests skip; the reference and input-validation tests never skip.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import import_interpreted, run_file_in_child

from notelab.core.norms import RMSNorm

kernels, IN_PROCESS = import_interpreted("notelab.lm.kernels")
fused_matvec, fused_matvec_reference = kernels.fused_matvec, kernels.fused_matvec_reference

MODES = ["plain", "norm", "silu"]
# A bf16 value v is within 2**-8 |v| of its rounding to nearest, within 2**-7 |v| of its rounding toward zero.
BF16_ULP = 2.0**-7


@pytest.fixture
def interp(monkeypatch):
    """Skip without triton, or where triton was imported before TRITON_INTERPRET=1 (then a child runs them)."""
    pytest.importorskip("triton")
    if not IN_PROCESS:
        pytest.skip("triton was imported without TRITON_INTERPRET=1 first: test_kernel_tests_in_a_fresh_process")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.triton_available()


def case(mode, M=3, N=37, K=100, residual=False, dtype=torch.float32, seed=0):
    """x, w and the keyword arguments of one call; N and K are not multiples of any block size."""
    g = torch.Generator().manual_seed(seed)
    kx = 2 * K if mode == "silu" else K
    x = torch.randn(M, kx, generator=g)
    w = torch.randn(N, K, generator=g) / K**0.5
    kw = {}
    if mode == "norm":
        kw["norm_weight"] = (1 + 0.5 * torch.randn(K, generator=g)).to(dtype)
        kw["eps"] = 1e-5
    if mode == "silu":
        kw["silu_mul"] = True
    if residual:
        kw["residual"] = torch.randn(M, N, generator=g).to(dtype)
    return x.to(dtype), w.to(dtype), kw


def unfused(x, w, norm_weight=None, eps=1e-6, silu_mul=False, residual=None):
    """The sequence of torch ops the kernel replaces: RMSNorm module / F.silu(g) * u, then F.linear, + r."""
    if norm_weight is not None:
        norm = RMSNorm(x.shape[-1], eps=eps).to(x.dtype)
        with torch.no_grad():
            norm.weight.copy_(norm_weight)
            inp = norm(x)
    elif silu_mul:
        gate, up = x.chunk(2, dim=-1)
        inp = F.silu(gate) * up
    else:
        inp = x
    y = F.linear(inp, w)
    return y if residual is None else residual + y


def bf16_bound(x, w, kw, ref):
    """Elementwise bound on |kernel - reference| in bf16.

    The interpreter rounds float32 -> bfloat16 toward zero (the GPU rounds to nearest), so every rounding the
    kernel shares with torch may land one ulp (<= 2**-7 relative) away: two on each input element (normalise,
    * g; or SiLU, * up) -> 2 ulp x S with S = |inp| @ |w|^T; one on y and one on y + r -> |ref| + |r| terms.
    """
    xf = x.float()
    if kw.get("norm_weight") is not None:
        inp = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + kw["eps"]) * kw["norm_weight"].float()
    elif kw.get("silu_mul"):
        gate, up = xf.chunk(2, dim=-1)
        inp = F.silu(gate) * up
    else:
        inp = xf
    S = inp.abs() @ w.float().abs().T
    r = kw["residual"].float().abs() if kw.get("residual") is not None else 0.0
    return BF16_ULP * (2 * S + 2 * ref.float().abs() + r) + 1e-6


def assert_fp32_close(out, ref):
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def assert_bf16_close(out, ref, x, w, kw):
    assert out.dtype == ref.dtype == torch.bfloat16
    err = (out.float() - ref.float()).abs()
    bound = bf16_bound(x, w, kw, ref)
    assert (err <= bound).all(), f"max err {err.max().item():.4g}, max err / bound {(err / bound).max().item():.3f}"


# ------------------------------------------------------------------------------------------------------------
# The reference and the input checks: no triton needed, never skipped.


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_reference_is_the_unfused_torch_sequence(mode, residual):
    x, w, kw = case(mode, residual=residual)
    out = fused_matvec_reference(x, w, **kw)
    assert out.shape == (3, 37)
    assert_fp32_close(out, unfused(x, w, **kw))


@pytest.mark.parametrize("mode", MODES)
def test_reference_bf16_rounds_like_the_unfused_sequence(mode):
    x, w, kw = case(mode, residual=True, dtype=torch.bfloat16)
    ref = fused_matvec_reference(x, w, **kw)
    assert_bf16_close(unfused(x, w, **kw), ref, x, w, kw)


@pytest.mark.parametrize("fn", [fused_matvec, fused_matvec_reference])
def test_norm_and_silu_together_is_an_error(fn):
    x, w, kw = case("silu")
    with pytest.raises(ValueError, match="norm_weight.*silu_mul"):
        fn(x, w, norm_weight=torch.ones(100), silu_mul=True)


BAD_SHAPES = {
    "x width": (lambda x, w: dict(x=x[:, :99], w=w), "x: expected shape \\(M, 100\\), got \\(3, 99\\)"),
    "x 1-D": (lambda x, w: dict(x=x[0], w=w), "x: expected shape"),
    "w 1-D": (lambda x, w: dict(x=x, w=w[0]), "w: expected a 2-D"),
    "silu width": (lambda x, w: dict(x=x, w=w, silu_mul=True), "x: expected shape \\(M, 200\\).*got \\(3, 100\\)"),
    "norm weight": (lambda x, w: dict(x=x, w=w, norm_weight=torch.ones(99)), "norm_weight: expected shape \\(100,\\)"),
    "residual": (lambda x, w: dict(x=x, w=w, residual=torch.zeros(3, 36)), "residual: expected shape \\(3, 37\\)"),
}


@pytest.mark.parametrize("fn", [fused_matvec, fused_matvec_reference])
@pytest.mark.parametrize("name", list(BAD_SHAPES))
def test_bad_shapes_are_errors(fn, name):
    x, w, _ = case("plain")
    make, message = BAD_SHAPES[name]
    with pytest.raises(ValueError, match=message):
        fn(**make(x, w))


BAD_LAYOUTS = {
    "x strided": (lambda x, w: dict(x=torch.randn(100, 3).T, w=w), "x: expected a contiguous tensor"),
    "w strided": (lambda x, w: dict(x=x, w=torch.randn(100, 37).T), "w: expected a contiguous tensor"),
    "residual strided": (
        lambda x, w: dict(x=x, w=w, residual=torch.zeros(37, 3).T),
        "residual: expected a contiguous tensor",
    ),
    "residual dtype": (
        lambda x, w: dict(x=x, w=w, residual=torch.zeros(3, 37, dtype=torch.float64)),
        "residual: expected float32, float16 or bfloat16, got torch.float64",
    ),
    "residual not x's dtype": (
        lambda x, w: dict(x=x, w=w, residual=torch.zeros(3, 37, dtype=torch.bfloat16)),
        "residual: expected x's dtype torch.float32, got torch.bfloat16",
    ),
    "integer x": (lambda x, w: dict(x=x.long(), w=w), "x: expected float32, float16 or bfloat16, got torch.int64"),
    "w elsewhere": (lambda x, w: dict(x=x, w=w.to("meta")), "w: expected a tensor on x's device cpu, got meta"),
}


@pytest.mark.parametrize("name", list(BAD_LAYOUTS))
def test_bad_layouts_are_errors(name):
    x, w, _ = case("plain")
    make, message = BAD_LAYOUTS[name]
    with pytest.raises(ValueError, match=message):
        fused_matvec(**make(x, w))


@pytest.mark.parametrize("mode", MODES)
def test_without_the_kernel_fused_matvec_is_the_reference(mode, monkeypatch):
    monkeypatch.setattr(kernels, "triton", None)
    x, w, kw = case(mode, residual=True)
    assert torch.equal(fused_matvec(x, w, **kw), fused_matvec_reference(x, w, **kw))


# ------------------------------------------------------------------------------------------------------------
# The kernel, through the interpreter.


@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_kernel_fp32(interp, mode, residual, M):
    x, w, kw = case(mode, M=M, residual=residual, seed=M)
    out = fused_matvec(x, w, **kw)
    assert out.shape == (M, 37)
    assert_fp32_close(out, fused_matvec_reference(x, w, **kw))
    assert_fp32_close(out, unfused(x, w, **kw))


@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_kernel_bf16(interp, mode, residual, M):
    x, w, kw = case(mode, M=M, residual=residual, dtype=torch.bfloat16, seed=10 + M)
    out = fused_matvec(x, w, **kw)
    assert_bf16_close(out, fused_matvec_reference(x, w, **kw), x, w, kw)
    assert_bf16_close(out, unfused(x, w, **kw), x, w, kw)


@pytest.mark.parametrize("mode", MODES)
def test_kernel_fp16_rounds_where_torch_rounds(interp, mode):
    """The interpreter rounds float32 -> float16 to nearest, as the GPU does, so the kernel agrees with the
    reference bit for bit except where the summation order tips a rounding (one ulp). That checks the rounding
    points: computing inp and y + r in float32 throughout changes 29-47% of these outputs."""
    x, w, kw = case(mode, residual=True, dtype=torch.float16, seed=20)
    out, ref = fused_matvec(x, w, **kw), fused_matvec_reference(x, w, **kw)
    assert (out != ref).float().mean().item() <= 0.05
    torch.testing.assert_close(out, ref, rtol=2.0**-10, atol=2.0**-10 * ref.abs().max().item())


def test_bf16_norm_weight_in_float32(interp):
    """A float32 norm weight makes torch's `* g` float32 (no rounding): the kernel follows the promotion."""
    x, w, kw = case("norm", residual=True, dtype=torch.bfloat16, seed=30)
    kw["norm_weight"] = kw["norm_weight"].float() + 1e-3
    assert_bf16_close(fused_matvec(x, w, **kw), fused_matvec_reference(x, w, **kw), x, w, kw)


@pytest.mark.parametrize(("block_n", "block_k", "mode"), [(8, 32, "norm"), (4, 64, "silu"), (16, 16, "plain")])
def test_tiles_that_loop_over_k(interp, block_n, block_k, mode):
    """Small tiles: several K steps with a partial last one, and a partial last row block."""
    x, w, kw = case(mode, residual=True, seed=40)
    out = kernels._launch_config(x, w, block_n=block_n, block_k=block_k, **kw)
    assert_fp32_close(out, fused_matvec_reference(x, w, **kw))


@pytest.mark.parametrize("cfg", kernels._CONFIG_TABLE, ids=lambda c: "n{}_k{}_w{}_s{}".format(*c))
def test_every_autotune_config(interp, cfg):
    block_n, block_k, num_warps, _ = cfg
    x, w, kw = case("norm", M=1, residual=True, seed=50)
    out = kernels._launch_config(x, w, block_n=block_n, block_k=block_k, num_warps=num_warps, **kw)
    assert_fp32_close(out, fused_matvec_reference(x, w, **kw))


def test_custom_op(interp):
    op = torch.ops.notelab.fused_matvec.default
    assert str(op._schema) == (
        "notelab::fused_matvec(Tensor x, Tensor w, Tensor? norm_weight, Tensor? residual, float eps, bool silu_mul)"
        " -> Tensor"
    )
    x, w, kw = case("silu", residual=True, seed=60)
    out = op(x, w, None, kw["residual"], 1e-6, True)
    assert_fp32_close(out, fused_matvec_reference(x, w, **kw))
    assert kernels.last_autotune_config() is not None


TRACE = textwrap.dedent(
    """
    import logging
    import torch
    from torch._dynamo.backends.common import aot_autograd
    from notelab.lm import kernels

    logging.disable(logging.WARNING)  # without a GPU, torch warns that it cannot analyse the kernel's stores
    kernels._INTERPRET = True  # dispatch CPU tensors to the op (the kernel itself cannot run here: it is traced only)
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm.code)
        return gm

    def step(x, w, g, r, w_up, w_down):
        h = kernels.fused_matvec(x, w, norm_weight=g, residual=r)
        a = kernels.fused_matvec(h, w_up, norm_weight=g)
        return kernels.fused_matvec(a, w_down, silu_mul=True, residual=h)

    f = torch.compile(step, backend=aot_autograd(fw_compiler=keep), fullgraph=True)
    args = (torch.randn(1, 64), torch.randn(64, 64), torch.ones(64), torch.randn(1, 64),
            torch.randn(256, 64), torch.randn(64, 128))
    try:
        f(*args)
    except Exception:
        pass  # running needs a GPU; the graph was captured before
    code = graphs[0]
    print(code.count("triton_kernel_wrapper_functional("), "aten.mm" in code, "aten.rsqrt" in code)
    """
)


def test_op_traces_under_torch_compile_fullgraph(interp):
    """torch.compile(fullgraph=True) sees the kernel: three launches of it, no matmul or norm left in the graph.

    Needs a process where triton.jit made a compilable kernel (not the interpreter's), so it runs in a child."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", TRACE], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["3", "False", "False"], run.stdout + run.stderr[-3000:]


def test_kernel_tests_in_a_fresh_process():
    """Where this process cannot interpret kernels, run this file in a child that can (see the module docstring)."""
    run_file_in_child(__file__, IN_PROCESS, skipped=1 + 2 * len(MODES))  # this test and the CUDA ones


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the compiled kernel)")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_on_cuda_matches_reference(mode, dtype):
    """The compiled kernel on the GPU, every mode with and without the residual, M = 1 and 3."""
    for M, residual in [(1, False), (3, True)]:
        x, w, kw = case(mode, M=M, N=300, K=1000, residual=residual, dtype=dtype, seed=70)
        x, w = x.cuda(), w.cuda()
        kw = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        out, ref = fused_matvec(x, w, **kw), fused_matvec_reference(x, w, **kw)
        # float32: summation order only; bfloat16: one rounding of the output (2**-8 relative) either way
        tol = 1e-4 if dtype == torch.float32 else 2.0**-7
        torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
