"""notelab.lm.attend: RoPE of the queries and attention over the static cache in one Triton kernel, against the
engine's torch attention, on CPU through Triton's interpreter (``triton_interpreter``: a child process where another
module imported triton first); on a GPU the compiled kernel, also inside the engine's compiled, captured step."""

import warnings

import pytest
import torch
from triton_interpreter import GPU, import_interpreted, run_file_in_child
from triton_interpreter import small_llama as model_of

from notelab.core.rope import rope_cos_sin, rope_inv_freq
from notelab.lm import generate
from notelab.lm.engine import Engine, SamplingParams, rotated_attention

attend, IN_PROCESS = import_interpreted("notelab.lm.attend")
DEV = "cuda" if GPU else "cpu"


@pytest.fixture
def interp(monkeypatch):
    pytest.importorskip("triton")
    if not (IN_PROCESS or GPU):
        pytest.skip("triton was imported without TRITON_INTERPRET=1 first: test_attend_tests_in_a_fresh_process")
    if not GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def case(B=3, Hq=8, Hkv=2, L=37, D=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, 1, Hq, D, generator=g).transpose(1, 2)  # the engine's (B, Hq, 1, D) view
    k, v = torch.randn(2, B, Hkv, L, D, generator=g)
    pos = torch.tensor([0, L - 1, L // 2, 5][:B])
    cos, sin = rope_cos_sin(pos[:, None], rope_inv_freq(D, 10000.0, None))
    rope = (cos[:, None], sin[:, None])  # (B, 1, 1, D), as the engine makes them
    return [t.to(DEV, dtype) for t in (q, k, v)] + [pos.to(DEV), tuple(t.to(DEV) for t in rope)]


@pytest.mark.parametrize("heads", [(8, 2), (4, 4), (6, 2)])
@pytest.mark.parametrize("block", [4, 32])
def test_rope_attention_equals_the_torch_attention(interp, heads, block):
    """Rows see keys 0..pos (a slot past the row's changes nothing for it); RoPE or none; groups of 4, 1 and 3
    query heads (3: padded to 4); blocks of keys smaller than the rows' keys, or larger."""
    q, k, v, pos, rope = case(Hq=heads[0], Hkv=heads[1])
    for r in (rope, None):
        got = attend.rope_attention(q, k, v, pos, r, block)
        torch.testing.assert_close(got, rotated_attention(q, k, v, pos, r), rtol=1e-5, atol=1e-5)
    k2 = k.clone()
    k2[0, :, 1:] += 5.0  # row 0 is at slot 0
    want = attend.rope_attention(q, k, v, pos, rope, block)[0]
    assert torch.equal(attend.rope_attention(q, k2, v, pos, rope, block)[0], want)


def test_rope_attention_in_bf16_is_within_a_rounding(interp):
    q, k, v, pos, rope = case(dtype=torch.bfloat16)
    got = attend.rope_attention(q, k, v, pos, rope).float()
    want = rotated_attention(q.float(), k.float(), v.float(), pos, rope)
    torch.testing.assert_close(got, want, rtol=0.03, atol=0.03)


def test_engine_with_rope_attention_gives_the_reference_tokens(interp):
    """Greedy and sampled float32 tokens through the engine with the kernel equal the reference loop's; on a GPU
    the kernel runs inside the compiled, captured step (a compile failure, the eager fallback, fails the test)."""
    model = model_of(device=DEV)
    prompts = [[5, 6, 7], list(range(1, 12)), [9, 9, 4]]
    for kw in ({}, dict(temperature=0.9, top_p=0.9)):
        engine = Engine(model, max_batch=3, stacked=True, attention=attend.rope_attention)
        ids = {engine.add(p, SamplingParams(10, seed=b, **kw)): b for b, p in enumerate(prompts)}
        got = [[] for _ in prompts]
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            while engine.has_work():
                for e in engine.step():
                    if e.token is not None:
                        got[ids[e.request_id]].append(e.token)
        want = [generate(model, [p], 10, path="reference", seed=b, **kw)[0] for b, p in enumerate(prompts)]
        assert got == want, kw


def test_rope_attention_says_why_it_cannot_run():
    if attend.triton is None:
        assert attend.attend_unsupported(torch.zeros(1), 16) == "triton is not installed"
    elif not (GPU or attend._INTERPRET):
        assert "CUDA" in attend.attend_unsupported(torch.zeros(1), 16)
        q, k, v, pos, rope = case()
        with pytest.raises(RuntimeError, match="rope_attention: .*CUDA"):
            attend.rope_attention(q, k, v, pos, rope)
    else:
        assert "power of two" in attend.attend_unsupported(torch.zeros(1, device=DEV), 24)


def test_attend_tests_in_a_fresh_process():
    run_file_in_child(__file__, IN_PROCESS, skipped=1)  # this test
