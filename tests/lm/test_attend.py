"""notelab.lm.attend: RoPE of the queries and attention over the static cache in Triton kernels, against the engine's
torch attention, on CPU through Triton's interpreter (``triton_interpreter``: a child process where another module
imported triton first); the ``gpu`` test runs the compiled kernels."""

import pytest
import torch
from triton_interpreter import GPU, import_interpreted, run_file_in_child, use_interpreter

from notelab.core.attention import KVCache
from notelab.core.rope import rope_cos_sin, rope_inv_freq
from notelab.lm.engine import rotated_attention

attend, IN_PROCESS = import_interpreted("notelab.lm.attend")


@pytest.fixture
def interp(monkeypatch):
    use_interpreter(IN_PROCESS, monkeypatch)


def case(B=4, Hq=8, Hkv=2, L=37, D=16, dtype=torch.float32, dev="cpu"):
    """Queries and the new keys / values of B rows (the engine's (B, H, 1, D) views), a cache whose slots hold
    random keys and values, the rows' slots (0, the last, the middle, a block's first key) and RoPE tables."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, 1, Hq, D, generator=g).transpose(1, 2)
    k, v = torch.randn(2, B, 1, Hkv, D, generator=g).transpose(2, 3)
    cache = KVCache(B, Hkv, L, D, dtype=dtype, device=dev)
    cache.k.copy_(torch.randn(B, Hkv, L, D, generator=g))
    cache.v.copy_(torch.randn(B, Hkv, L, D, generator=g))
    pos = torch.tensor([0, L - 1, L // 2, 16][:B])
    cos, sin = rope_cos_sin(pos[:, None], rope_inv_freq(D, 10000.0, None))
    rope = (cos[:, None], sin[:, None])  # (B, 1, 1, D), as the engine makes them
    return [t.to(dev, dtype) for t in (q, k, v)] + [cache, pos.to(dev), tuple(t.to(dev) for t in rope)]


def copy_of(cache: KVCache) -> KVCache:
    other = KVCache(*cache.k.shape[:2], cache.max_len, cache.k.shape[3], dtype=cache.k.dtype, device=cache.k.device)
    other.k.copy_(cache.k)
    other.v.copy_(cache.v)
    return other


def check(dev: str, heads=(8, 2), block=16, D=16) -> None:
    q, k, v, cache, pos, rope = case(Hq=heads[0], Hkv=heads[1], D=D, dev=dev)
    for r, pdl in ((rope, None), (None, None), (rope, False), (rope, True)):
        ours, ref = copy_of(cache), copy_of(cache)
        got = attend.rope_attention(q, k, v, ours, pos, r, block, pdl=pdl)
        torch.testing.assert_close(got, rotated_attention(q, k, v, ref, pos, r), rtol=1e-5, atol=1e-5)
        # the new keys (rotated: one rounding apart where the GPU fuses a multiply-add) and values written
        torch.testing.assert_close(ours.k, ref.k, rtol=1e-6, atol=1e-6)
        assert torch.equal(ours.v, ref.v)
    other = copy_of(cache)
    other.k[0, :, 1:] += 5.0  # row 0 sits at slot 0: later keys and values change nothing for it
    other.v[0, :, 1:] -= 3.0
    want = attend.rope_attention(q, k, v, copy_of(cache), pos, rope, block)[0]
    assert torch.equal(attend.rope_attention(q, k, v, other, pos, rope, block)[0], want)
    x = torch.randn(q.shape[0], 48, generator=torch.Generator().manual_seed(1)).to(dev) * 3.0  # dim 48: masked
    ours, ref = copy_of(cache), copy_of(cache)
    got = attend.rope_attention(q, k, v, ours, pos, rope, block, norm=(x, 1e-5))  # RMSNorm's factor folded in
    torch.testing.assert_close(got, rotated_attention(q, k, v, ref, pos, rope, (x, 1e-5)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.k, ref.k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.v, ref.v, rtol=1e-6, atol=1e-6)
    q, k, v, cache, pos, rope = case(Hq=heads[0], Hkv=heads[1], D=D, dtype=torch.bfloat16, dev=dev)
    ours, ref = copy_of(cache), KVCache(*cache.k.shape[:2], cache.max_len, D, device=dev)
    ref.k.copy_(cache.k)
    ref.v.copy_(cache.v)
    got = attend.rope_attention(q, k, v, ours, pos, rope, block).float()
    want = rotated_attention(q.float(), k.float(), v.float(), ref, pos, rope)
    torch.testing.assert_close(got, want, rtol=0.03, atol=0.03)


@pytest.mark.parametrize("heads", [(8, 2), (4, 4), (6, 2)])
@pytest.mark.parametrize("block", [16, 32])
def test_rope_attention_equals_the_torch_attention(interp, heads, block):
    """Rows see keys 0..pos only; the new keys (rotated) and values land in the cache as the torch step writes
    them; RoPE or none; groups of 4, 1 and 3 query heads (3: padded); blocks of keys shorter than most rows, or
    as long; the RMSNorm factor of the residual rows applied first or not; float32 (to 1e-5) and
    bf16 (within a few roundings)."""
    check("cpu", heads, block)


def test_rope_attention_says_why_it_cannot_run():
    if attend.triton is None:
        assert attend.attend_unsupported(torch.zeros(1), 16) == "triton is not installed"
        return
    q, k, v, cache, pos, rope = case()
    if not attend._INTERPRET:
        assert "CUDA" in attend.attend_unsupported(torch.zeros(1), 16)
        with pytest.raises(RuntimeError, match="rope_attention: .*CUDA"):
            attend.rope_attention(q, k, v, cache, pos, rope)
    else:
        assert "power of two" in attend.attend_unsupported(torch.zeros(1), 24)
        assert "power of two" in attend.attend_unsupported(torch.zeros(1), 8)


def test_attend_tests_in_a_fresh_process():
    run_file_in_child(__file__, IN_PROCESS, skipped=2)  # this test and the GPU test


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs CUDA (the compiled kernels)")
def test_rope_attention_on_cuda():
    check("cuda", (8, 2), 32, D=64)
    check("cuda", (6, 2), 16, D=16)
