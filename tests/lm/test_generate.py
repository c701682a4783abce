"""Generation through the public API: every path gives the reference's tokens, padded rows get their own budget,
sampling is reproducible across paths, and the sampling functions do what their equations say."""

import warnings

import pytest
import torch

from notelab.core.errors import ConfigError, ShapeError
from notelab.lm import Llama, LlamaConfig, generate, next_token, stream
from notelab.lm.generate import ContextLimitWarning, left_pad
from notelab.lm.sampling import apply_repetition_penalty, filter_threshold, uniform_noise

PATHS = ["reference", "engine"]


def model_of(dtype=torch.float32, **kw) -> Llama:
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


@pytest.mark.parametrize("path", PATHS)
def test_cached_greedy_equals_recompute(path):
    model = model_of(torch.float64)
    prompt = torch.randint(0, 101, (9,)).tolist()
    assert generate(model, [prompt], 12, path=path)[0] == greedy_by_recompute(model, prompt, 12)


@pytest.mark.parametrize("variant", [{}, dict(norm="layernorm", mlp="gelu", pos="learned")])
def test_padded_batch_equals_each_prompt_alone_on_every_path(variant):
    model = model_of(**variant)
    prompts = [torch.randint(1, 101, (n,)).tolist() for n in (3, 11, 7)]
    alone = [generate(model, [p], 10, path="reference")[0] for p in prompts]
    for path in ("auto", *PATHS):
        assert generate(model, prompts, 10, path=path) == alone, path
    assert generate(model, torch.tensor([prompts[1]]), 10) == alone[1:2]  # a tensor prompt: unpadded


@pytest.mark.parametrize("path", PATHS)
def test_short_row_gets_its_full_budget_beside_a_long_row(path):
    """Issue 9 item 9: the context limit is each row's own, and hitting it is reported."""
    model = model_of()
    long, short = torch.randint(1, 101, (55,)).tolist(), [4, 5, 6]
    with pytest.warns(ContextLimitWarning, match=r"rows \[0\]"):
        out = generate(model, [long, short], 20, path=path)
    assert len(out[0]) == 64 - 55 and len(out[1]) == 20
    with warnings.catch_warnings():
        warnings.simplefilter("error", ContextLimitWarning)
        assert out[1] == generate(model, [short], 20, path="reference")[0]
    with pytest.warns(ContextLimitWarning):
        assert out[0] == generate(model, [long], 20, path="reference")[0]


@pytest.mark.parametrize("path", PATHS)
def test_stop_tokens_and_streaming(path):
    model = model_of(torch.float64)
    prompt = [5, 17, 33, 2]
    full = generate(model, [prompt], 10, path=path)[0]
    stop = full[3]
    first = full.index(stop)
    seen = []
    out = generate(model, [prompt], 10, stop_tokens=[stop], path=path, callback=lambda r, t: seen.append((r, t)))
    assert out[0] == full[:first] and seen == [(0, t) for t in full[:first]]
    steps = list(stream(model, [prompt, prompt[:2]], 4, path=path))
    assert len(steps) == 4 and all(len(s) == 2 and None not in s for s in steps)
    steps = list(stream(model, [prompt, [9, 9]], 10, stop_tokens=[stop], path=path))
    assert steps == list(stream(model, [prompt, [9, 9]], 10, stop_tokens=[stop], path="reference"))
    assert [s[0] for s in steps[:first]] == full[:first] and all(s[0] is None for s in steps[first:])


def test_sampled_tokens_are_the_same_on_every_path_for_a_seed():
    model = model_of()
    prompts = [[3, 4, 5], [9, 8, 7, 6, 5, 4], [1]]
    kw = dict(temperature=1.3, top_k=40, top_p=0.9, repetition_penalty=1.2)
    ref = generate(model, prompts, 12, seed=3, path="reference", **kw)
    assert generate(model, prompts, 12, seed=3, path="engine", **kw) == ref
    assert generate(model, prompts, 12, seed=3, **kw) == ref
    assert generate(model, prompts, 12, seed=4, **kw) != ref
    # row b samples with seed + b: the second row alone with seed 4 draws what it drew in the batch
    assert generate(model, prompts[1:2], 12, seed=4, **kw)[0] == ref[1]
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert generate(model, prompts, 8, seed=g1, temperature=2.0) == generate(
        model, prompts, 8, seed=g2, temperature=2.0
    )
    # temperature with top-k 1 is greedy
    assert generate(model, prompts, 8, temperature=0.7, top_k=1, seed=0) == generate(model, prompts, 8)
    draws = {tuple(generate(model, prompts[:1], 8, temperature=5.0, seed=s)[0]) for s in range(4)}
    assert len(draws) > 1


def test_gumbel_draws_follow_the_softmax_and_noise_is_a_pure_function():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(4000, 1)
    draws = next_token(logits, temperature=1.0, seed=11)  # row b draws with seed 11 + b
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    assert torch.allclose(freq, probs, atol=0.03)
    seed, counter = torch.tensor([1, 1, 2]), torch.tensor([0, 1, 0])
    u = uniform_noise(seed, counter, 1000)
    assert torch.equal(u, uniform_noise(seed, counter, 1000)) and u.min() > 0 and u.max() < 1
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    assert abs(float(u.mean()) - 0.5) < 0.03


def test_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    k_all, k2 = torch.tensor([[4]]), torch.tensor([[2]])

    def kept(k, p):
        return (logits >= filter_threshold(logits, k, torch.tensor([[p]]))).tolist()

    assert kept(k_all, 0.7) == [[True, True, False, False]]  # 0.5 < 0.7 <= 0.8
    assert kept(k_all, 0.8) == [[True, True, False, False]]
    assert kept(k_all, 0.81) == [[True, True, True, False]]
    assert kept(k_all, 1.0) == [[True] * 4]
    assert kept(k2, 1.0) == [[True, True, False, False]]
    assert kept(k2, 0.4) == [[True, False, False, False]]
    seen = torch.tensor([[True, False, True, False]])
    out = apply_repetition_penalty(torch.tensor([[2.0, 2.0, -1.0, -1.0]]), seen, 2.0)
    assert out.tolist() == [[1.0, 2.0, -2.0, -1.0]]


def test_left_pad():
    tokens, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert tokens.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]


def test_chain_path_falls_back_with_a_reason_where_it_cannot_run():
    model = model_of()
    prompt = [[3, 4, 5]]
    with pytest.warns(RuntimeWarning, match="chain path cannot run"):
        out = generate(model, prompt, 6, path="chain", temperature=1.0, seed=0)
    assert out == generate(model, prompt, 6, path="reference", temperature=1.0, seed=0)


def test_context_limits_and_bad_input():
    model = model_of()
    with pytest.raises(ShapeError, match="64"):
        generate(model, [list(range(64))], 5)
    with pytest.warns(ContextLimitWarning):
        assert len(generate(model, [list(range(60))], 10)[0]) == 4  # stops when the context is full
    with pytest.raises(ShapeError, match="empty"):
        generate(model, [[]], 5)
    with pytest.raises(ShapeError, match="101"):
        generate(model, [[1, 200]], 5)
    with pytest.raises(ConfigError, match="top_p"):
        generate(model, [[1]], 5, temperature=1.0, top_p=1.5)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate(model, [[1]], 0)
    with pytest.raises(ConfigError, match="path"):
        generate(model, [[1]], 5, path="fast")
    with pytest.raises(ConfigError, match="compile"):
        generate(model, [[1]], 5, compile=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_every_path_on_cuda_gives_the_reference_tokens():
    model = model_of().cuda()
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    ref = generate(model, prompts, 12, path="reference")
    assert generate(model, prompts, 12) == ref  # the engine, compiled and captured
    assert generate(model, prompts[:1], 12) == ref[:1]  # the chain
    kw = dict(temperature=0.8, top_p=0.95, seed=2)
    assert generate(model, prompts, 12, **kw) == generate(model, prompts, 12, path="reference", **kw)
    assert generate(model, prompts[:1], 12, **kw) == generate(model, prompts[:1], 12, path="reference", **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_replaced_parameters_are_read_by_the_next_call():
    """Graphs replay fixed addresses: after a parameter is replaced by a new tensor (not updated in place), the
    next call of the same shapes builds new ones, and gives the reference path's tokens of the new weights."""
    model = model_of().cuda()
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9, 10, 11]]  # one length: the engine's prompt forward is captured
    for _ in range(2):  # the second call replays the captured prompt forward and step
        assert generate(model, prompts, 8) == generate(model, prompts, 8, path="reference")
    with torch.no_grad():
        a = model.layers[1].self_attn
        a.q_proj.weight = torch.nn.Parameter(a.q_proj.weight.flip(0) * 1.5)
        model.layers[0].mlp.up_proj.weight = torch.nn.Parameter(model.layers[0].mlp.up_proj.weight.flip(1))
    assert generate(model, prompts, 8) == generate(model, prompts, 8, path="reference")
    assert generate(model, prompts[:1], 8) == generate(model, prompts[:1], 8, path="reference")  # the chain


def test_generate_runs_in_eval_mode_and_restores_the_modes():
    """A model in training mode generates as in eval mode and is back in training mode after; one in eval mode
    stays there (the modes are switched only when some module trains)."""
    model = model_of()
    want = generate(model, [[5, 6, 7]], 6)
    model.train()
    seen = []
    hook = model.layers[0].register_forward_pre_hook(lambda m, args: seen.append(m.training))
    assert generate(model, [[5, 6, 7]], 6) == want
    hook.remove()
    assert seen and not any(seen)
    assert all(m.training for m in model.modules())
    model.eval()
    generate(model, [[5, 6, 7]], 6)
    assert not any(m.training for m in model.modules())


def test_a_held_engine_serves_shorter_calls():
    """The engine ``generate`` holds for a model is reused by a call needing no longer a cache (no new compile
    and capture on CUDA), with the reference's tokens, and replaced by one with a longer cache when needed."""
    from notelab.lm.generate import _HELD

    model = model_of()
    prompts = [[5, 6, 7], [1, 2, 3]]
    engines = []
    for n in (8, 4, 8, 12):
        assert generate(model, prompts, n, path="engine") == generate(model, prompts, n, path="reference"), n
        engines.append(_HELD[model]["engine"][1])
    assert engines[0] is engines[1] is engines[2] and engines[0].max_len == 11
    assert engines[3] is not engines[0] and engines[3].max_len == 15
