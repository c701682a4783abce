"""Generation: KV-cache decoding equals recomputation, padded batches equal single prompts, sampling filters."""

import pytest
import torch

from notelab.core.errors import ConfigError, ShapeError
from notelab.lm import Llama, LlamaConfig, generate, next_token, stream
from notelab.lm.generate import (
    _GREEDY,
    _decode_forward,
    apply_repetition_penalty,
    chunked_argmax,
    left_pad,
    matmul_attention,
    matvec_sum,
    top_k_filter,
    top_p_filter,
)


def model_of(dtype=torch.float64, **kw) -> Llama:
    base = dict(vocab_size=101, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=64)
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**{**base, **kw})).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def greedy_by_recompute(model: Llama, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


@pytest.mark.parametrize("static", [False, True])
def test_cached_greedy_equals_recompute(static):
    model = model_of()
    prompt = torch.randint(0, 101, (9,)).tolist()
    assert generate(model, [prompt], 12, static=static)[0] == greedy_by_recompute(model, prompt, 12)


@pytest.mark.parametrize("static", [False, True])
def test_padded_batch_equals_each_prompt_alone(static):
    model = model_of(dtype=torch.float32)
    prompts = [torch.randint(1, 101, (n,)).tolist() for n in (3, 11, 7)]
    batched = generate(model, prompts, 10, static=static)
    alone = [generate(model, [p], 10)[0] for p in prompts]
    assert batched == alone


def test_stop_tokens_and_streaming():
    model = model_of()
    prompt = [5, 17, 33, 2]
    full = generate(model, [prompt], 10)[0]
    stop = full[3]
    first = full.index(stop)
    seen = []
    out = generate(model, [prompt], 10, stop_tokens=[stop], callback=lambda row, tok: seen.append((row, tok)))
    assert out[0] == full[:first]
    assert seen == [(0, t) for t in full[:first]]
    steps = list(stream(model, [prompt, prompt[:2]], 4))
    assert len(steps) == 4 and all(len(s) == 2 for s in steps)


def test_sampling_reproducible_and_degenerate_cases_greedy():
    model = model_of(dtype=torch.float32)
    prompt = [[3, 4, 5]]
    greedy = generate(model, prompt, 8)
    assert generate(model, prompt, 8, temperature=0.7, top_k=1) == greedy
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = generate(model, prompt, 8, temperature=1.5, top_p=0.9, generator=g1)
    assert a == generate(model, prompt, 8, temperature=1.5, top_p=0.9, generator=g2)
    samples = {tuple(generate(model, prompt, 8, temperature=5.0, generator=g1)[0]) for _ in range(4)}
    assert len(samples) > 1


def test_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(top_p_filter(logits, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(top_p_filter(logits, 0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(top_p_filter(logits, 0.81)).tolist() == [[False, False, False, True]]
    assert torch.isinf(top_k_filter(logits[:, [3, 0, 2, 1]], 2)).tolist() == [[True, False, True, False]]
    seen = torch.tensor([[True, False, True, False]])
    out = apply_repetition_penalty(torch.tensor([[2.0, 2.0, -1.0, -1.0]]), seen, 2.0)
    assert out.tolist() == [[1.0, 2.0, -2.0, -1.0]]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([next_token(logits.repeat(2000, 1), temperature=1.0, generator=g) for _ in range(1)])
    freq = torch.bincount(draws.flatten(), minlength=4).float() / draws.numel()
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.04)


def test_left_pad():
    tokens, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert tokens.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]


def test_context_limits_and_bad_input():
    model = model_of()
    with pytest.raises(ShapeError, match="64"):
        generate(model, [list(range(64))], 5)
    assert len(generate(model, [list(range(60))], 10)[0]) == 4  # stops when the context is full
    with pytest.raises(ShapeError, match="empty"):
        generate(model, [[]], 5)
    with pytest.raises(ShapeError, match="101"):
        generate(model, [[1, 200]], 5)
    with pytest.raises(ConfigError, match="top_p"):
        generate(model, [[1]], 5, temperature=1.0, top_p=1.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiling on CPU takes minutes; checked by benchmarks")
def test_compiled_decode_step_matches_eager():
    model = model_of(dtype=torch.float32).cuda()
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    eager = generate(model, prompts, 6)
    assert generate(model, prompts, 6, compile=True) == eager  # greedy fast path: inductor step in a CUDA graph
    assert generate(model, prompts, 6, compile=True, sync_every=4) == eager
    assert generate(model, prompts, 6, compile="reduce-overhead") == eager  # torch.compile's own CUDA graphs
    assert generate(model, prompts, 6, static=True) == eager  # the eager step captured in a CUDA graph
    assert generate(model, prompts, 6, compile=True, fast_greedy=False) == eager  # general per-token path
    assert generate(model, prompts, 6, compile=True, fuse=False) == eager  # the plain step, no stacked weights
    assert generate(model, prompts, 6, compile=True, decode_attention="reduce") == eager
    assert generate(model, prompts, 6, compile=True, decode_matvec="reduce") == eager  # products as reductions
    assert generate(model, prompts, 6, compile=True, decode_matvec="triton") == eager  # notelab.lm.kernels
    # batch 1 on CUDA: "auto" runs the step as notelab.lm.chain's kernels (whatever compile says)
    assert generate(model, prompts[:1], 6, compile=True) == eager[:1]
    assert _GREEDY[model][1].chain is not None
    assert generate(model, prompts[:1], 6, compile=True, decode_matvec="cublas") == eager[:1]
    assert _GREEDY[model][1].chain is None


@pytest.mark.parametrize("sync_every", [1, 3, 64])
def test_fast_greedy_equals_eager_path(sync_every):
    model = model_of(dtype=torch.float32)
    prompts = [torch.randint(1, 101, (n,)).tolist() for n in (3, 11, 7)]
    eager = generate(model, prompts, 10)  # dynamic cache, general per-token path
    general = generate(model, prompts, 10, static=True, fast_greedy=False)
    fast = generate(model, prompts, 10, static=True, sync_every=sync_every)
    assert fast == eager == general
    # The buffers are reused on a second call of the same shape, and one new token needs no decode step.
    assert generate(model, prompts, 10, static=True, sync_every=sync_every) == eager
    assert generate(model, [prompts[0]], 1, static=True)[0] == eager[0][:1]


@pytest.mark.parametrize("sync_every", [1, 4])
def test_fast_greedy_stop_tokens_and_streaming(sync_every):
    model = model_of()
    prompt = [5, 17, 33, 2]
    full = generate(model, [prompt], 10)[0]
    stop = full[3]
    first = full.index(stop)
    kw = dict(static=True, sync_every=sync_every, stop_tokens=[stop])
    seen = []
    out = generate(model, [prompt], 10, callback=lambda row, tok: seen.append((row, tok)), **kw)
    assert out[0] == full[:first] and seen == [(0, t) for t in full[:first]]
    steps = list(stream(model, [prompt, [9, 9]], 10, **kw))
    ref = list(stream(model, [prompt, [9, 9]], 10, stop_tokens=[stop]))
    assert steps == ref and len(steps) <= 10
    with pytest.raises(ConfigError, match="sync_every"):
        generate(model, [prompt], 3, static=True, sync_every=0)


@pytest.mark.parametrize("variant", [{}, dict(norm="layernorm", mlp="gelu", pos="learned")])
def test_fused_decode_step_equals_forward(variant):
    model = model_of(**variant)  # float64: the stacked step must equal the plain one to rounding
    fused = model.fused_decode_weights()
    hidden = model.config.hidden_dim
    assert [w.shape[0] for w in fused[0] if w is not None] == [64 + 32 + 32] + ([] if variant else [2 * hidden])
    assert (fused[0][1] is None) == bool(variant)  # no [gate; up] for a GELU MLP
    tokens = torch.tensor([[0, 5, 9, 2], [4, 8, 1, 7]])
    attention_mask = torch.tensor([[False, True, True, True], [True] * 4]).repeat(1, 3)
    positions = torch.tensor([[-1, 0, 1, 2], [0, 1, 2, 3]]).clamp(min=0)
    cache, ref_cache = model.make_cache(2, 12), model.make_cache(2, 12)
    with torch.no_grad():
        model._forward(tokens, 0, positions, attention_mask[:, :4], cache, 1)
        model._forward(tokens, 0, positions, attention_mask[:, :4], ref_cache, 1)
        slot, tok = torch.tensor(4), torch.tensor([[3], [6]])
        ref = model._forward(tok, slot, positions[:, -1:] + 1, attention_mask, ref_cache, 1)
        for attn, matvec in [("sdpa", "cublas"), ("matmul", "cublas"), ("reduce", "cublas"), ("sdpa", "reduce")]:
            step = (tok, slot, positions[:, -1:] + 1, attention_mask, cache, attn, matvec)
            out = _decode_forward(model, fused, *step)
            torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
            if not variant:  # and the separate weights
                torch.testing.assert_close(_decode_forward(model, None, *step), ref, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(cache[1].k, ref_cache[1].k, rtol=1e-12, atol=1e-12)


def test_matmul_attention_equals_sdpa_with_grouped_heads():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 2, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)  # query heads 2h, 2h+1 read kv head h
    per_row = torch.rand(2, 1, 2, 6) > 0.3
    per_row[..., 0] = True
    causal = torch.ones(2, 6, dtype=torch.bool).tril(4)  # (T, S), shared by the batch
    for mask in (per_row, causal):
        ref = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)
        for elementwise in (False, True):
            torch.testing.assert_close(matmul_attention(q, k, v, mask, elementwise=elementwise), ref)


def test_matvec_sum_and_chunked_argmax():
    torch.manual_seed(0)
    x, w = torch.randn(2, 3, 40), torch.randn(24, 40)
    torch.testing.assert_close(matvec_sum(x, w), x @ w.T, rtol=1e-5, atol=1e-5)
    assert matvec_sum(x.bfloat16(), w.bfloat16()).dtype == torch.bfloat16
    for n, chunk in [(1, 4), (10, 4), (12, 4), (1000, 64), (5, 1024)]:
        logits = torch.randn(3, n)
        assert torch.equal(chunked_argmax(logits, chunk), logits.argmax(-1, keepdim=True))
        ties = torch.randint(0, 3, (3, n)).float()  # many equal maxima: the first one, as argmax
        assert torch.equal(chunked_argmax(ties, chunk), ties.argmax(-1, keepdim=True))


@pytest.mark.parametrize(
    "decode_attention, decode_matvec",
    [("sdpa", "cublas"), ("matmul", "cublas"), ("reduce", "cublas"), ("sdpa", "reduce")],
)
def test_fused_fast_path_equals_eager_and_follows_weight_changes(decode_attention, decode_matvec):
    model = model_of(dtype=torch.float32)
    prompts = [torch.randint(1, 101, (n,)).tolist() for n in (3, 11, 7)]
    kw = dict(static=True, sync_every=4, fuse=True, decode_attention=decode_attention, decode_matvec=decode_matvec)
    assert generate(model, prompts, 10, **kw) == generate(model, prompts, 10)
    with torch.no_grad():  # in place, as an optimizer step: the stacked copies must be refreshed
        for layer in model.layers:
            layer.mlp.up_proj.weight.mul_(-1.0)
            layer.self_attn.k_proj.weight.mul_(0.5)
    eager = generate(model, prompts, 10)
    assert generate(model, prompts, 10, **kw) == eager
    generate(model, prompts, 2, static=True)
    assert _GREEDY[model][1].attn == "sdpa" and _GREEDY[model][1].fused is not None  # defaults, uncompiled
    with pytest.raises(ConfigError, match="decode_attention"):
        generate(model, prompts, 2, **{**kw, "decode_attention": "flash"})
    with pytest.raises(ConfigError, match="decode_matvec"):
        generate(model, prompts, 2, **{**kw, "decode_matvec": "gemv"})
