import math

import torch

from notelab.core.mlp import FeedForward, SwiGLU
from notelab.core.norms import RMSNorm
from notelab.core.rope import RopeScaling, apply_rope, llama3_scale, rope_cos_sin, rope_inv_freq


def test_rope_preserves_norm_and_depends_on_relative_position():
    inv = rope_inv_freq(16, theta=10000.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 1, 1, 16, generator=g).unbind(0)

    def rot(x, p):
        cos, sin = rope_cos_sin(torch.tensor([p]), inv)
        return apply_rope(x, cos, sin)

    assert torch.allclose(rot(q, 7).norm(), q.norm(), atol=1e-5)
    a = (rot(q, 10) * rot(k, 4)).sum()
    b = (rot(q, 26) * rot(k, 20)).sum()
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(a, (rot(q, 10) * rot(k, 5)).sum(), atol=1e-4)


def test_llama3_scaling_piecewise():
    s = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    inv = 1.0 / 500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    out = llama3_scale(inv, s)
    wavelen = 2 * math.pi / inv
    high = wavelen < 8192 / 4
    low = wavelen > 8192 / 1
    assert torch.equal(out[high], inv[high])
    assert torch.allclose(out[low], inv[low] / 8)
    mid = ~high & ~low
    assert mid.any() and ((out[mid] < inv[mid]) & (out[mid] > inv[mid] / 8)).all()


def test_llama3_scaling_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(
        hidden_size=256,
        num_attention_heads=2,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = rope_inv_freq(128, theta=500000.0, scaling=RopeScaling())
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-8)


def test_rmsnorm_matches_torch():
    x = torch.randn(3, 5, 8)
    ours = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        ours.weight.uniform_()
    ref = torch.nn.RMSNorm(8, eps=1e-6)
    ref.weight.data.copy_(ours.weight.data)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-5)


def test_swiglu_and_feedforward_formulas():
    x = torch.randn(4, 6)
    m = SwiGLU(6, 10)
    expected = m.down_proj(torch.nn.functional.silu(m.gate_proj(x)) * m.up_proj(x))
    torch.testing.assert_close(m(x), expected)
    f = FeedForward(6, 12)
    torch.testing.assert_close(f(x), f.fc2(torch.relu(f.fc1(x))))
