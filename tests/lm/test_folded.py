"""notelab.lm.folded: the decode step with the RMSNorms folded into the projections. Its algebra against the
stacked step (float32), the engine's tokens against the reference loop's, the SiLU-product kernel against the
torch function on CPU through Triton's interpreter (``triton_interpreter``: a child process where another module
imported triton first); the ``gpu`` test runs the compiled, captured step."""

import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from triton_interpreter import GPU, engine_tokens, import_interpreted, run_file_in_child, use_interpreter
from triton_interpreter import small_llama as model_of

from notelab.core.norms import rms_norm
from notelab.lm import generate
from notelab.lm.engine import FOLDED, STACKED, Engine, StackedLayers, rotated_attention, stacked_forward

folded, IN_PROCESS = import_interpreted("notelab.lm.folded")
# the folded step whose attention and SiLU kernels ask L2 for the next products' weights
PREFETCHING = StackedLayers(
    folded.folded_weights,
    partial(folded.folded_forward, prefetch=folded.Prefetch(1.0, 0.5, 0.5, 1.0)),
    folded.folded_unsupported,
)


@pytest.fixture
def interp(monkeypatch):
    use_interpreter(IN_PROCESS, monkeypatch)


def with_gains(model):  # noqa: ANN001, ANN201
    """The model with RMSNorm gains away from 1 (a fold of all-ones gains would test nothing)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in model.layers:
            for n in (layer.input_layernorm, layer.post_attention_layernorm):
                n.weight.copy_(0.5 + torch.rand(n.weight.shape, generator=g).to(n.weight))
    return model


def test_folded_weights_carry_the_gains():
    """``x (W diag g)^T`` times the row's RMSNorm factor is ``RMSNorm(x) W^T`` (float32, to rounding)."""
    model = with_gains(model_of())
    stacked, fold = model.fused_decode_weights(), folded.folded_weights(model)
    x = torch.randn(5, model.config.dim) * 2.0
    for layer, (w_qkv, w_gu), (f_qkv, f_gu) in zip(model.layers, stacked, fold, strict=True):
        for w, f, norm in ((w_qkv, f_qkv, layer.input_layernorm), (w_gu, f_gu, layer.post_attention_layernorm)):
            want = F.linear(rms_norm(x, norm.weight, norm.eps), w)
            got = F.linear(x, f) * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    before = fold[1][1].clone()
    again = folded.folded_weights(model, out=fold)  # refilled in place (captured graphs read it), the same values
    assert again[1][1].data_ptr() == fold[1][1].data_ptr() and torch.equal(again[1][1], before)


def test_folded_forward_equals_the_stacked_forward():
    """The logits of one step and the keys / values it writes, over caches holding a prompt (float32)."""
    model = with_gains(model_of())
    B, prompt = 3, torch.randint(1, 100, (3, 6), generator=torch.Generator().manual_seed(1))
    caches = [model.make_cache(B, 16) for _ in range(2)]
    for cache in caches:
        model._forward(prompt, torch.zeros(B, dtype=torch.long), None, None, cache, 6)
    tok, pos = torch.tensor([[4], [7], [9]]), torch.tensor([6, 6, 6])
    with torch.no_grad():
        want = stacked_forward(model, model.fused_decode_weights(), tok, pos, caches[0])
        got = folded.folded_forward(model, folded.folded_weights(model), tok, pos, caches[1], rotated_attention)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for a, b in zip(caches[0], caches[1], strict=True):
        torch.testing.assert_close(a.k, b.k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.v, b.v, rtol=1e-5, atol=1e-5)


def check_engine(dev: str, layers: StackedLayers = FOLDED, **parts) -> None:
    """The folded engine's greedy and sampled (top-p) tokens equal the reference loop's (float32)."""
    model = with_gains(model_of(device=dev))
    prompts = [[5, 6, 7], list(range(1, 12)), [9, 9, 4]]
    for kw in (dict(temperature=0.9, top_p=0.8), {}):
        want = [generate(model, [p], 10, path="reference", seed=3 + b, **kw)[0] for b, p in enumerate(prompts)]
        assert engine_tokens(model, prompts, kw, layers=layers, **parts) == want, kw


def test_engine_with_folded_norms_gives_the_reference_tokens():
    check_engine("cpu")


def test_folded_engine_under_autocast():
    """float32 weights under bf16 autocast (the products in bf16, the residual rows float32): the stacked step's
    greedy tokens."""
    model = with_gains(model_of())
    prompts = [[5, 6, 7], list(range(1, 12)), [9, 9, 4]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert engine_tokens(model, prompts, {}, layers=FOLDED) == engine_tokens(model, prompts, {}, layers=STACKED)


def test_folded_says_why_it_cannot_run():
    model = model_of()
    model.layers[1].post_attention_layernorm = nn.LayerNorm(model.config.dim)
    assert "layers.1: the norms are not RMSNorm" in folded.folded_unsupported(model)
    with pytest.warns(RuntimeWarning, match="stacked projections off .*RMSNorm"):
        Engine(model, max_batch=2, stacked=True, layers=FOLDED)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_silu_kernel_equals_the_torch_function(interp, dtype):
    """Rows of [gate; up] of width 2 x 1,100 (a partial block) and residual rows of width 48 (masked)."""
    g = torch.Generator().manual_seed(0)
    gate_up, x = torch.randn(3, 2200, generator=g).to(dtype), (torch.randn(3, 48, generator=g) * 4).to(dtype)
    got = folded.gated_silu(gate_up, x, 1e-5)
    want = folded.gated_silu_torch(gate_up, x, 1e-5)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.02, atol=0.02)
    torch.testing.assert_close(got, want, **tol)


def test_engine_with_folded_norms_and_kernels(interp):
    from notelab.lm.attend import rope_attention
    from notelab.lm.nucleus import draw_tokens, pivot_threshold

    check_engine("cpu", attention=rope_attention, threshold=pivot_threshold, draw=draw_tokens)


def test_engine_with_prefetching_kernels(interp):
    """The prefetch regions reach the kernels' operators (the interpreter runs no PTX: they ask for no lines)."""
    from notelab.lm.attend import rope_attention

    check_engine("cpu", PREFETCHING, attention=rope_attention)


COMPILE_FOR_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from notelab.lm import attend, folded
ints = {"sgu", "sx", "I", "D", "pa_lines", "pb_lines", "sqb", "sqh", "skb", "skh", "svb", "svh", "sxb", "S"}
floats = {"eps", "scale"}
def compile(fn, **constexprs):
    sig = {n: "i32" if n in ints else "fp32" if n in floats else "*i64" if n == "pos_ptr" else "*bf16"
           for n in fn.arg_names if n not in constexprs}
    sig.update({n: "constexpr" for n in constexprs})
    ptx = triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    print(fn.__name__, ptx.count("prefetch.global.L2"))
compile(folded._gated_silu_kernel, DP2=2048, BLOCK=1024, PREFETCH=True)
compile(attend._split_kernel, HD=64, G=4, GQ=4, GP=16, NSPLIT=10, NSP2=16, BLOCK_S=32, ROPE=True, IEEE=False,
        NORM=True, DP2=2048, PREFETCH=True)
"""


def test_prefetching_kernels_compile_for_hopper():
    """The kernels with their L2 prefetch requests (inline PTX, which the interpreter does not run) compile for
    sm_90, each with its two regions' ``prefetch.global.L2`` (compiled in a process without the interpreter)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter's child process: compiled by the parent")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = str(Path(folded.__file__).parents[2])
    env["PYTHONPATH"] = src + ":" + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_FOR_HOPPER], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["_gated_silu_kernel", "2", "_split_kernel", "2"], done.stdout


def test_folded_tests_in_a_fresh_process():
    run_file_in_child(__file__, IN_PROCESS, skipped=4)  # this test, the compile test and the GPU tests


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs CUDA (the compiled kernels)")
@pytest.mark.parametrize("layers", [FOLDED, PREFETCHING], ids=["folded", "prefetching"])
def test_folded_engine_on_cuda(layers):
    """Compiled and captured with the default kernels (no fallback), with and without the L2 prefetch requests:
    the reference tokens (float32)."""
    check_engine("cuda", layers)
