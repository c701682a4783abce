"""The engine's decode parts: its attention over the static cache equals the library attention, each top-k / top-p
threshold equals the sorted one, and the stacked step gives the reference loop's tokens with either."""

import pytest
import torch

from notelab.core.attention import attention
from notelab.lm import Llama, LlamaConfig, generate
from notelab.lm.engine import Engine, SamplingParams, decode_attention
from notelab.lm.sampling import bisect_threshold, filter_threshold


def prefix_case(B=3, Hq=8, Hkv=2, S=37, D=16, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, 1, Hq, D, generator=g).transpose(1, 2)  # the engine's (B, Hq, 1, D) view
    k, v = torch.randn(2, B, Hkv, S, D, generator=g)
    pos = torch.tensor([0, S - 1, S // 2, 5][:B])
    mask = (torch.arange(S) <= pos[:, None])[:, None, None]  # keys 0..pos_b, as the engine masks
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)] + [mask.to(device)]


def test_decode_attention_equals_attention():
    attend = decode_attention
    q, k, v, mask = prefix_case()
    torch.testing.assert_close(attend(q, k, v, mask=mask), attention(q, k, v, mask=mask), rtol=1e-5, atol=1e-6)
    # a changed key outside a row's prefix changes nothing for that row
    k2 = k.clone()
    k2[0, :, 1:] += 5.0
    assert torch.equal(attend(q, k2, v, mask=mask)[0], attend(q, k, v, mask=mask)[0])


@pytest.mark.parametrize("scale", [0.1, 1.0, 6.0])
def test_threshold_without_a_sort_equals_the_sorted_one(scale):
    threshold = bisect_threshold
    g = torch.Generator().manual_seed(int(scale * 10))
    scaled = torch.randn(6, 999, generator=g) * scale
    scaled[5, :10] = scaled[5, 10]  # ties at the edge are kept by both
    top_k = torch.tensor([[999], [7], [999], [50], [1], [999]])
    top_p = torch.tensor([[0.95], [0.5], [1.0], [0.9], [0.3], [0.2]])
    ref = filter_threshold(scaled, top_k, top_p)
    assert torch.equal(threshold(scaled, top_k, top_p), ref)
    no_k = torch.full_like(top_k, 999)
    assert torch.equal(threshold(scaled, no_k, top_p, False), filter_threshold(scaled, no_k, top_p))
    kept = (scaled >= ref).sum(-1)
    assert kept[2] == 999 and kept[4] == 1 and kept[1] <= 7  # the filters did act


def test_bisection_on_a_llama3_vocabulary_keeps_the_sorts_tokens_up_to_rounding():
    """128,256 logits a row, spread (temperature-like scales 1-3): the bisection's kept set differs from the
    sort's float32 cumulative sum by at most a few tokens at the edge (the sort's running sum over ~10^4 tokens
    rounds by about the mass of one of them); top-k and top-p both act."""
    g = torch.Generator().manual_seed(3)
    scaled = torch.randn(8, 128256, generator=g) * torch.linspace(1.0, 3.0, 8)[:, None]
    top_k = torch.full((8, 1), 128256)
    top_k[3] = 40
    top_p = torch.tensor([[0.95], [0.9], [0.5], [0.95], [1.0], [0.99], [0.8], [0.95]])
    kept = (scaled >= bisect_threshold(scaled, top_k, top_p)).sum(-1)
    by_sort = (scaled >= filter_threshold(scaled, top_k, top_p)).sum(-1)
    assert (kept - by_sort).abs().max() <= 3 and kept[3] <= 40 and kept[4] == 128256
    assert (kept[[0, 1, 2, 5, 6, 7]] < 128256).all()  # top-p acted


def model_of() -> Llama:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, dim=64, n_layers=2, n_heads=8, n_kv_heads=2, multiple_of=16, max_seq_len=64)
    model = Llama(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def engine_tokens(engine: Engine, prompts, n, **kw):
    ids = {engine.add(p, SamplingParams(n, seed=b, **kw)): b for b, p in enumerate(prompts)}
    got = [[] for _ in prompts]
    while engine.has_work():
        for e in engine.step():
            if e.token is not None:
                got[ids[e.request_id]].append(e.token)
    return got


@pytest.mark.parametrize("threshold", [filter_threshold, bisect_threshold])
def test_stacked_step_gives_the_reference_tokens(threshold):
    model = model_of()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11, 12]]
    eng = Engine(model, 3, 32, stacked=True, threshold=threshold)
    assert engine_tokens(eng, prompts, 12) == generate(model, prompts, 12, path="reference")
    sampled = dict(temperature=1.0, top_p=0.8, top_k=20)
    ref = generate(model, prompts, 12, path="reference", seed=0, **sampled)
    assert engine_tokens(eng, prompts, 12, **sampled) == ref
