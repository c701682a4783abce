"""Parity with vector-quantize-pytorch (lucidrains): nearest codes, straight-through output and gradient."""

import pytest
import torch

from notelab.vq import VectorQuantizer

vqp = pytest.importorskip("vector_quantize_pytorch")


@pytest.mark.parametrize("image", [False, True])
def test_same_codes_output_and_gradient_as_vector_quantize_pytorch(image):
    torch.manual_seed(0)
    K, D = 16, 6
    ours = VectorQuantizer(K, D, beta=0.25).eval()
    peer = vqp.VectorQuantize(
        dim=D, codebook_size=K, commitment_weight=0.25, rotation_trick=False, accept_image_fmap=image
    ).eval()
    with torch.no_grad():
        peer._codebook.embed.copy_(ours.codebook.detach()[None])
    x = torch.randn(3, D, 4, 5) if image else torch.randn(3, 10, D)
    x_ours, x_peer = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    q, idx, _, _ = ours(x_ours)
    q_peer, idx_peer, _ = peer(x.clone())
    assert torch.equal(idx, idx_peer)
    torch.testing.assert_close(q, q_peer)
    # The peer applies the straight-through estimator in training mode; frozen, its codebook stays put.
    peer.train()
    q_peer, idx_peer, _ = peer(x_peer, freeze_codebook=True)
    assert torch.equal(idx, idx_peer)
    torch.testing.assert_close(q.detach(), q_peer.detach())
    g = torch.randn_like(q)
    (q * g).sum().backward()
    (q_peer * g).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_peer.grad)
