"""Prefix tuning on notelab.seq's encoder-decoder (Li & Liang 2021 tuned BART the same way): learned keys and
values in encoder self-attention, decoder self-attention and cross-attention, with the decoder's KV cache."""

import copy

import torch

from notelab.peft import PrefixTuningConfig, get_peft_model
from notelab.seq import Transformer, TransformerConfig, greedy_decode

V = 11


def seq_model():
    torch.manual_seed(0)
    cfg = TransformerConfig(
        src_vocab=V, tgt_vocab=V, d_model=16, n_heads=2, n_layers_enc=1, n_layers_dec=2, d_ff=32, max_len=16
    )
    return Transformer(cfg).eval()


def test_prefix_tuning_on_the_encoder_decoder():
    base = seq_model()
    reference = copy.deepcopy(base)
    config = PrefixTuningConfig(num_virtual_tokens=3, encoder_hidden_size=8, target_modules=["self_attn", "cross_attn"])
    peft = get_peft_model(base, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained prefix, not the initial one
        for p in peft.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    m = peft.base_model
    src = torch.randint(3, V, (2, 7), generator=g)
    tgt = torch.randint(3, V, (2, 5), generator=g)
    hooked = [n for n, mod in m.named_modules() if getattr(mod, "kv_prefix", None) is not None]
    assert len(hooked) == 1 + 2 * 2  # encoder self-attention, decoder self- and cross-attention
    with torch.no_grad():
        adapted = m(src, tgt)
        with peft.disable_adapter():
            torch.testing.assert_close(m(src, tgt), reference(src, tgt))
    assert (adapted - reference(src, tgt)).abs().max() > 1e-3  # the prefix changes the output
    # decoding with the KV cache equals full recomputation at every step, prefix included
    with torch.no_grad():
        cached = greedy_decode(m, src, 8, use_cache=True)
        full = greedy_decode(m, src, 8, use_cache=False)
    torch.testing.assert_close(cached, full)
    # only the prefix parameters learn
    peft.train()
    m(src, tgt).logsumexp(-1).mean().backward()
    grads = {n for n, p in peft.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all("prefix" in n for n in grads)
