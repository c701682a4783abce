"""notelab.lm.folded: the decode step with the RMSNorms folded into the projections. Its algebra against the
stacked step (float32), the engine's tokens against the reference loop's, the SiLU-product kernel against the
torch function on CPU through Triton's interpreter (``triton_interpreter``: a child process where another module
imported triton first); the ``gpu`` test runs the compiled, captured step."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from triton_interpreter import GPU, engine_tokens, import_interpreted, run_file_in_child, use_interpreter, with_gains
from triton_interpreter import small_llama as model_of

from notelab.core.norms import rms_norm
from notelab.lm import generate
from notelab.lm.engine import FOLDED, STACKED, Engine, rotated_attention, stacked_forward

folded, IN_PROCESS = import_interpreted("notelab.lm.folded")


@pytest.fixture
def interp(monkeypatch):
    use_interpreter(IN_PROCESS, monkeypatch)


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


def test_folded_weights_round_once_in_bf16():
    """bf16 weights and gains: each folded entry is the float32 product rounded to bf16 once (bit for bit)."""
    model = with_gains(model_of()).to(torch.bfloat16)
    stacked, fold = model.fused_decode_weights(), folded.folded_weights(model)
    for layer, (w_qkv, w_gu), (f_qkv, f_gu) in zip(model.layers, stacked, fold, strict=True):
        for w, f, norm in ((w_qkv, f_qkv, layer.input_layernorm), (w_gu, f_gu, layer.post_attention_layernorm)):
            assert torch.equal(f, (w.float() * norm.weight.float()).to(torch.bfloat16))


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


def check_engine(dev: str, **parts) -> None:
    """The folded engine's greedy and sampled (top-p) tokens equal the reference loop's (float32)."""
    model = with_gains(model_of(device=dev))
    prompts = [[5, 6, 7], list(range(1, 12)), [9, 9, 4]]
    for kw in (dict(temperature=0.9, top_p=0.8), {}):
        want = [generate(model, [p], 10, path="reference", seed=3 + b, **kw)[0] for b, p in enumerate(prompts)]
        assert engine_tokens(model, prompts, kw, layers=FOLDED, **parts) == want, kw


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


def test_folded_tests_in_a_fresh_process():
    run_file_in_child(__file__, IN_PROCESS, skipped=2)  # this test and the GPU test


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs CUDA (the compiled kernels)")
def test_folded_engine_on_cuda():
    """Compiled and captured with the default kernels (no fallback): the reference tokens (float32)."""
    check_engine("cuda")
