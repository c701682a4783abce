import math

import pytest
import torch

from notelab.core.attention import KVCache, attention, causal_mask, padding_mask
from notelab.core.errors import ShapeError


def reference(q, k, v, mask=None):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("hkv", [4, 2, 1])
def test_attention_matches_softmax_formula_with_gqa(hkv):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g)
    k, v = torch.randn(2, 2, hkv, 7, 8, generator=g).unbind(0)
    mask = torch.rand(2, 1, 5, 7, generator=g) > 0.3
    mask[..., 0] = True
    torch.testing.assert_close(attention(q, k, v, mask=mask), reference(q, k, v, mask), atol=1e-5, rtol=1e-5)
    full = causal_mask(5, 5)
    qq = torch.randn(2, 4, 5, 8, generator=g)
    torch.testing.assert_close(
        attention(qq, k[:, :, :5], v[:, :, :5], is_causal=True), reference(qq, k[:, :, :5], v[:, :, :5], full)
    )


def test_gqa_with_mask_folds_groups_without_changing_the_result():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 6, 3, 8, generator=g)
    k, v = torch.randn(2, 2, 2, 9, 8, generator=g).unbind(0)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, :4] = True  # left padding in row 1
    for mask in (padding_mask(pad), padding_mask(pad)[0, 0]):
        expected = reference(q, k, v, mask & causal_mask(3, 9))
        torch.testing.assert_close(attention(q, k, v, mask=mask, is_causal=True), expected, atol=1e-5, rtol=1e-5)
    per_head = torch.rand(2, 6, 3, 9, generator=g) > 0.2
    per_head[..., -1] = True
    torch.testing.assert_close(attention(q, k, v, mask=per_head), reference(q, k, v, per_head), atol=1e-5, rtol=1e-5)


def test_causal_with_cache_is_aligned_bottom_right():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(3, 1, 2, 6, 4, generator=g).unbind(0)
    full = attention(q, k, v, is_causal=True)
    last2 = attention(q[:, :, -2:], k, v, is_causal=True)
    torch.testing.assert_close(last2, full[:, :, -2:])
    assert causal_mask(2, 6).tolist() == [[True] * 5 + [False], [True] * 6]


def test_fully_masked_rows_are_zero_not_nan():
    q, k, v = torch.randn(3, 1, 1, 3, 4).unbind(0)
    pad = torch.tensor([[False, True, True]])
    mask = padding_mask(pad) & torch.tensor([False, True, True])[:, None]  # query 0 sees nothing
    out = attention(q, k, v, mask=mask)
    assert torch.isfinite(out).all()
    assert out[0, 0, 0].abs().sum() == 0


def test_attention_rejects_bad_shapes():
    with pytest.raises(ShapeError, match="multiple of key/value heads"):
        attention(torch.randn(1, 3, 2, 4), torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4))
    with pytest.raises(ShapeError, match="expected q"):
        attention(torch.randn(3, 2, 4), torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4))


def test_kv_cache_update_and_write():
    cache = KVCache(1, 2, 6, 4)
    k, v = torch.randn(2, 1, 2, 3, 4).unbind(0)
    kk, vv = cache.update(0, k, v)
    assert kk.shape == (1, 2, 3, 4) and torch.equal(kk, k) and torch.equal(vv, v)
    k1 = torch.randn(1, 2, 1, 4)
    kk, _ = cache.update(3, k1, k1)
    assert kk.shape[2] == 4 and torch.equal(kk[:, :, 3:], k1)
    fk, _ = cache.write(torch.tensor([5]), k1 * 2, k1)
    assert fk.shape == (1, 2, 6, 4) and torch.equal(fk[:, :, 5:], k1 * 2)
    with pytest.raises(ShapeError, match="cache holds 6"):
        cache.update(5, k, v)
