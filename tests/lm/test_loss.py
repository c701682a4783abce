"""notelab.lm.loss: the chunked cross-entropy fused with the output projection equals the plain one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from notelab.core.errors import ShapeError
from notelab.lm import Llama, LlamaConfig
from notelab.lm.loss import chunk_loss_and_grad, default_chunk, linear_cross_entropy
from notelab.lm.train import next_token_loss


def plain(hidden, weight, targets, ignore_index=-100):
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index)


def grads(loss_fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    loss = loss_fn(*leaves)
    # a non-unit upstream gradient: backward must scale the gradients computed in forward
    return (loss, *torch.autograd.grad(loss * 1.7, leaves))


@pytest.mark.parametrize("chunk", [1, 5, 16, 1000])
def test_loss_and_gradients_equal_full_logits_cross_entropy(chunk):
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(3, 7, 16, generator=g), torch.randn(50, 16, generator=g)
    targets = torch.randint(0, 50, (3, 7), generator=g)
    targets[0, :4] = -100  # ignored positions: no loss, no gradient, not in the mean
    ours = grads(lambda h, w: linear_cross_entropy(h, w, targets, chunk=chunk), hidden, weight)
    ref = grads(lambda h, w: plain(h, w, targets), hidden, weight)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert ours[1][0, :4].abs().max() == 0  # ignored rows get no gradient


@pytest.mark.parametrize("tie", [True, False])
def test_next_token_loss_on_llama_equals_full_logits_tied_and_untied(tie):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=32, tie_embeddings=tie
    )
    model = Llama(config)
    batch = torch.randint(0, 97, (3, 17), generator=torch.Generator().manual_seed(1))
    loss, metrics = next_token_loss(model, batch)
    loss.backward()
    ours = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    logits = model(batch[:, :-1])
    ref = F.cross_entropy(logits.reshape(-1, 97), batch[:, 1:].reshape(-1))
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    assert metrics == {"tokens": 48.0}
    assert (model.lm_head.weight is model.embed_tokens.weight) == tie
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_frozen_head_gets_no_gradient_and_no_grad_mode_gives_the_loss():
    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(9, 8, generator=g, requires_grad=True), torch.randn(30, 8, generator=g)
    targets = torch.randint(0, 30, (9,), generator=g)
    loss = linear_cross_entropy(hidden, weight, targets, chunk=4)
    loss.backward()
    assert weight.grad is None and hidden.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(
            linear_cross_entropy(hidden, weight, targets, chunk=2), plain(hidden, weight, targets)
        )


def test_bf16_autocast_matmuls_match_autocast_linear_within_bf16_rounding():
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(20, 16, generator=g), torch.randn(40, 16, generator=g)
    targets = torch.randint(0, 40, (20,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = grads(lambda h, w: linear_cross_entropy(h, w, targets, chunk=6), hidden, weight)
        ref = grads(lambda h, w: plain(h, w, targets), hidden, weight)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == hidden.dtype and ours[2].dtype == weight.dtype
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_chunk_default_and_bad_shapes():
    assert default_chunk(128256) == 4096 and default_chunk(2**22) == 128 and default_chunk(2**30) == 1
    with pytest.raises(ShapeError, match=r"weight \(V, d\)"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ShapeError, match="integer targets of shape"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ShapeError, match="chunk >= 1"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long), chunk=0)


def test_chunk_kernel_gives_the_loss_sum_and_the_scaled_softmax_gradient():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(6, 11, generator=g, requires_grad=True)
    y = torch.randint(0, 11, (6,), generator=g)
    keep = torch.tensor([True, True, False, True, True, False])
    scale = torch.tensor(0.25)
    loss, grad = chunk_loss_and_grad(z.detach(), y, keep, scale)
    ref = (F.cross_entropy(z, y, reduction="none") * keep).sum()
    (ref_grad,) = torch.autograd.grad(ref * scale, z)
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(grad, ref_grad)


def test_compiled_chunks_equal_the_eager_chunks():
    g = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(10, 8, generator=g), torch.randn(24, 8, generator=g)
    targets = torch.randint(0, 24, (10,), generator=g)
    targets[3] = -100
    eager = grads(lambda h, w: linear_cross_entropy(h, w, targets, chunk=5), hidden, weight)
    compiled = grads(lambda h, w: linear_cross_entropy(h, w, targets, chunk=5, compile=True), hidden, weight)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
