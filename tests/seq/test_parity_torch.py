"""Parity with PyTorch's reference layers given the same weights (eval mode, float32)."""

import pytest
import torch
from torch import nn

from notelab.seq.transformer import DecoderLayer, EncoderLayer, MultiHeadAttention, PostNorm, PreNorm

D, H, FF = 16, 4, 32


def copy_mha(ours: MultiHeadAttention, ref: nn.MultiheadAttention) -> None:
    wq, wk, wv = ref.in_proj_weight.detach().chunk(3)
    bq, bk, bv = ref.in_proj_bias.detach().chunk(3)
    with torch.no_grad():
        for proj, w, b in ((ours.q_proj, wq, bq), (ours.k_proj, wk, bk), (ours.v_proj, wv, bv)):
            proj.weight.copy_(w)
            proj.bias.copy_(b)
        ours.out_proj.load_state_dict(ref.out_proj.state_dict())


def copy_ff_and_norms(ours, ref, blocks_and_norms) -> None:
    ours.ff.fc1.load_state_dict(ref.linear1.state_dict())
    ours.ff.fc2.load_state_dict(ref.linear2.state_dict())
    for block, norm in blocks_and_norms:
        block.norm.load_state_dict(norm.state_dict())


def randomise_norms(module: nn.Module, g: torch.Generator) -> None:
    # LayerNorm starts at weight 1, bias 0; random values make the copy of norms observable.
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 6, D, generator=g)
    mem = torch.randn(3, 5, D, generator=g)
    src_pad = torch.zeros(3, 5, dtype=torch.bool)
    src_pad[1, 3:] = True
    src_pad[2, 4:] = True
    return g, x, mem, src_pad


def test_multi_head_attention_matches_torch():
    g, x, mem, src_pad = data()
    ref = nn.MultiheadAttention(D, H, batch_first=True).eval()
    ours = MultiHeadAttention(D, H).eval()
    copy_mha(ours, ref)
    # cross-attention with key padding
    want = ref(x, mem, mem, key_padding_mask=src_pad, need_weights=False)[0]
    got = ours(x, mem, mask=~src_pad[:, None, None, :])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # causal self-attention
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    want = ref(x, x, x, attn_mask=causal, need_weights=False)[0]
    torch.testing.assert_close(ours(x, is_causal=True), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_matches_torch(norm_first):
    g, _, x, pad = data(1)
    ref = nn.TransformerEncoderLayer(D, H, FF, dropout=0.1, batch_first=True, norm_first=norm_first).eval()
    randomise_norms(ref, g)
    ours = EncoderLayer(D, H, FF, 0.1, PreNorm if norm_first else PostNorm).eval()
    copy_mha(ours.self_attn, ref.self_attn)
    copy_ff_and_norms(ours, ref, [(ours.attn_block, ref.norm1), (ours.ff_block, ref.norm2)])
    with torch.no_grad():
        want = ref(x, src_key_padding_mask=pad)
        got = ours(x, ~pad[:, None, None, :])
    real = ~pad  # torch's fast path may zero the padded rows; only real tokens are defined
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_matches_torch(norm_first):
    g, y, mem, pad = data(2)
    ref = nn.TransformerDecoderLayer(D, H, FF, dropout=0.1, batch_first=True, norm_first=norm_first).eval()
    randomise_norms(ref, g)
    ours = DecoderLayer(D, H, FF, 0.1, PreNorm if norm_first else PostNorm).eval()
    copy_mha(ours.self_attn, ref.self_attn)
    copy_mha(ours.cross_attn, ref.multihead_attn)
    blocks = [(ours.attn_block, ref.norm1), (ours.cross_block, ref.norm2), (ours.ff_block, ref.norm3)]
    copy_ff_and_norms(ours, ref, blocks)
    causal = nn.Transformer.generate_square_subsequent_mask(y.shape[1])
    with torch.no_grad():
        want = ref(y, mem, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=pad)
        got = ours(y, mem, memory_mask=~pad[:, None, None, :])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
