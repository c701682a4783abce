"""notelab.lm.chain: the decode step as Triton kernels, against the torch model, on CPU through Triton's interpreter.

The interpreter must be chosen before triton and the chain module are first imported (``triton_interpreter``),
so where another module imported them first the interpreted tests skip here and
``test_chain_tests_in_a_fresh_process`` runs this file in a child process with TRITON_INTERPRET=1. The GPU
tests run the compiled kernels (with and without programmatic dependent launch) in bf16.
"""

import dataclasses
import warnings

import pytest
import torch
from triton_interpreter import GPU as _GPU
from triton_interpreter import import_interpreted, run_file_in_child, use_interpreter
from triton_interpreter import small_llama as model_of

from notelab.lm import Llama, generate

chain, IN_PROCESS = import_interpreted("notelab.lm.chain")
DecodeChain, chain_unsupported = chain.DecodeChain, chain.chain_unsupported
try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None


@pytest.fixture
def interp(monkeypatch):
    use_interpreter(IN_PROCESS, monkeypatch)


def chain_after_prompt(model: Llama, prompt: torch.Tensor, total: int, **kw) -> DecodeChain:
    """A chain whose cache holds the prompt (prefilled by the torch model) and whose token is the prompt's next."""
    dev, dtype = prompt.device, model.embed_tokens.weight.dtype
    cache = model.make_cache(1, total, dtype=dtype)
    logits = model._forward(prompt, 0, None, None, cache, 1)[:, -1]
    tok = logits.argmax(-1, keepdim=True)
    out = torch.zeros(1, total, dtype=torch.long, device=dev)
    slot = torch.tensor(prompt.shape[1], device=dev)
    return DecodeChain(model, model.fused_decode_weights(), cache, tok, slot, out, **kw)


def check_steps(model: Llama, n: int, tol: float, kv_tol: float, **kw) -> None:
    """n chain steps: logits, token, output row, slot and the new cache entries against the torch model."""
    torch.manual_seed(1)
    dev = model.embed_tokens.weight.device
    prompt = torch.randint(0, model.config.vocab_size, (1, 7), device=dev)
    total = 7 + n + 1
    ch = chain_after_prompt(model, prompt, total, store_logits=True, **kw)
    ref_cache = model.make_cache(1, total, dtype=model.embed_tokens.weight.dtype)
    model._forward(prompt, 0, None, None, ref_cache, 1)
    for i in range(n):
        s, tok = int(ch.slot), ch.tok.clone()
        ref = model._forward(tok, s, None, None, ref_cache, 1)[0, -1].float()
        ch.step()
        torch.testing.assert_close(ch.logits, ref, rtol=tol, atol=tol)
        for got, want in zip(ch.cache, ref_cache):
            torch.testing.assert_close(
                got.k[:, :, : s + 1].float(), want.k[:, :, : s + 1].float(), rtol=kv_tol, atol=kv_tol
            )
            torch.testing.assert_close(
                got.v[:, :, : s + 1].float(), want.v[:, :, : s + 1].float(), rtol=kv_tol, atol=kv_tol
            )
        # the token is the first maximum of the chain's own logits, written where the torch step writes it
        want_tok = int(ch.logits.argmax())
        assert int(ch.tok) == want_tok and int(ch.out[0, s + 1]) == want_tok and int(ch.slot) == s + 1, i
        assert int(ch.counts.abs().sum()) == 0 and int(ch.key) == torch.iinfo(torch.int64).min  # reset for the next


# Attention in one program per head, or (SPLIT) in blocks of 4 keys spread over up to 4 programs per head whose
# partial results the last one combines; small weight tiles, few output-projection programs looping over them.
SPLIT = chain.ChainOptions(attn_block=4, split_keys=4, max_splits=4, tile_elems=256, lm_programs_per_sm=1)


@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (4, 1)])
@pytest.mark.parametrize("options", [None, SPLIT], ids=["default", "split"])
def test_chain_step_matches_the_model(interp, heads, options):
    """GQA, MHA and MQA: float32 logits to 1e-4 and the cache entries, over several steps."""
    model = model_of(n_heads=heads[0], n_kv_heads=heads[1])
    check_steps(model, 4, tol=1e-4, kv_tol=1e-5, options=options)


def test_generate_chain_equals_the_torch_step(interp):
    model = model_of()
    prompt = torch.randint(0, 101, (5,)).tolist()
    want = generate(model, [prompt], 20, path="reference")[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the chain runs: no fallback
        assert generate(model, [prompt], 20, path="chain")[0] == want
    with torch.no_grad():  # in place, as an optimizer step: stacked copies refreshed, the others read directly
        for layer in model.layers:
            layer.mlp.up_proj.weight.mul_(-1.0)
            layer.self_attn.o_proj.weight.mul_(0.5)
        model.lm_head.weight.mul_(-1.0)
    want = generate(model, [prompt], 20, path="reference")[0]
    assert generate(model, [prompt], 20, path="chain")[0] == want
    stop = want[6]
    assert generate(model, [prompt], 20, path="chain", stop_tokens=[stop])[0] == want[: want.index(stop)]
    # sampling after the chain's step: the reference's tokens for the same seed
    for kw in (
        dict(temperature=1.2, top_p=0.9, seed=4),
        dict(repetition_penalty=1.5),
        dict(temperature=0.8, top_k=5, seed=1),
    ):
        want = generate(model, [prompt], 12, path="reference", **kw)[0]
        assert generate(model, [prompt], 12, path="chain", **kw)[0] == want, kw


@pytest.mark.parametrize(
    "dev", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not _GPU, reason="needs CUDA")])]
)
def test_argmax_key_orders_by_value_then_first_index(dev, request):
    """The 64-bit key of (value, index): negative, zero, positive and infinite values, and ties."""
    if dev == "cpu":
        request.getfixturevalue("interp")
    vals = torch.tensor([-3.5, 2.0, -0.5, 2.0, float("-inf"), 0.0, 7.25, -1e30, 7.25, 1e-30, float("inf"), -2.0])
    idx = torch.arange(vals.numel(), dtype=torch.int32)
    keys = torch.empty(vals.numel(), dtype=torch.int64, device=dev)

    @triton.jit
    def keys_kernel(v_ptr, i_ptr, k_ptr, n, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        m = o < n
        tl.store(k_ptr + o, chain._argmax_key(tl.load(v_ptr + o, mask=m), tl.load(i_ptr + o, mask=m)), mask=m)

    keys_kernel[(1,)](vals.to(dev), idx.to(dev), keys, vals.numel(), BLOCK=16)
    order = sorted(range(vals.numel()), key=lambda i: (vals[i].item(), -i))
    assert torch.argsort(keys.cpu()).tolist() == order
    assert 4294967295 - (int(keys.max()) & 0xFFFFFFFF) == 10  # the index back from the largest key


def test_ties_go_to_the_first_index(interp):
    """Equal logits in different programs' tiles: the chain picks the first, as torch.argmax does."""
    model = model_of(vocab_size=300)
    prompt = torch.randint(0, 300, (1, 6))
    with torch.no_grad():
        ch = chain_after_prompt(model, prompt, 10, store_logits=True)
        tok, s = ch.tok.clone(), int(ch.slot)
        ch.step()
        top = int(ch.logits.argmax())
        if top == 0:
            pytest.skip("the maximum is already the first entry")
        w = model.lm_head.weight
        w[0], w[299 if top != 299 else 298] = w[top], w[top]  # the same row: exactly the same logit
        ch.slot.fill_(s)
        ch.tok.copy_(tok)
        ch.step()
    assert ch.lm_programs > 1 and float(ch.logits[0]) == float(ch.logits[top]) == float(ch.logits.max())
    assert int(ch.tok) == 0


def test_unsupported_steps_say_why_and_generate_falls_back():
    dtype = torch.float32
    if not (chain._INTERPRET or _GPU):
        assert "CUDA" in chain_unsupported(model_of(), 1, False, dtype)
    else:
        dev = "cuda" if _GPU else "cpu"
        model = model_of(device=dev)
        assert chain_unsupported(model, 1, False, dtype) == ""
        assert "batch 1" in chain_unsupported(model, 2, False, dtype)
        assert "padding" in chain_unsupported(model, 1, True, dtype)
        assert "fuse" in chain_unsupported(model, 1, False, dtype, fuse=False)
        assert "dtype" in chain_unsupported(model, 1, False, torch.float16)
        assert "power of two" in chain_unsupported(
            model_of(device=dev, dim=48, n_heads=4, n_kv_heads=2), 1, False, dtype
        )
        gpt2 = model_of(device=dev, norm="layernorm", mlp="gelu", pos="learned")
        assert "RoPE" in chain_unsupported(gpt2, 1, False, dtype)
    # a batch of two cannot take the chain: generate says so and the engine runs, with the same tokens
    model = model_of()
    prompts = [[3, 4, 5], [7, 8, 9]]
    with pytest.warns(RuntimeWarning, match="chain path cannot run"):
        out = generate(model, prompts, 6, path="chain")
    assert out == generate(model, prompts, 6, path="reference")


def test_chain_tests_in_a_fresh_process():
    run_file_in_child(__file__, IN_PROCESS, skipped=1 + 4)  # this test and the four GPU tests


@pytest.mark.gpu
@pytest.mark.skipif(not _GPU, reason="needs CUDA (the compiled kernels)")
@pytest.mark.parametrize("pdl", [True, False])
def test_chain_on_cuda_matches_the_model(pdl):
    """Compiled kernels: float32 logits to 1e-4; bf16 logits within a few bf16 roundings of the torch step."""
    model = model_of(device="cuda")
    for options in (chain.ChainOptions(pdl=pdl), dataclasses.replace(SPLIT, pdl=pdl)):
        check_steps(model, 4, tol=1e-4, kv_tol=1e-5, options=options)
        bf16 = model_of(device="cuda", dtype=torch.bfloat16)
        check_steps(bf16, 4, tol=0.1, kv_tol=2.0**-6, options=options)


@pytest.mark.gpu
@pytest.mark.skipif(not _GPU, reason="needs CUDA")
def test_generate_chain_on_cuda_replays_a_graph():
    """Through generate (one captured CUDA graph a token, PDL on): float32 tokens equal the reference's, also for
    a second prompt of the same length (its forward replays the prefill graph captured by the first)."""
    model = model_of(device="cuda", max_seq_len=256)
    for seed in (0, 1):
        prompt = torch.randint(0, 101, (9,), generator=torch.Generator().manual_seed(seed)).tolist()
        want = generate(model, [prompt], 100, path="reference")[0]
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            assert generate(model, [prompt], 100, path="chain")[0] == want
