"""VectorQuantizer math: nearest codes, straight-through gradients, losses, EMA closed form, restarts."""

import pytest
import torch

from notelab.core.errors import ConfigError, DataError, ShapeError
from notelab.vq import VectorQuantizer, ema_codebook, laplace_smooth, squared_distances
from notelab.vq.quantizer import kmeans, perplexity


def _vq(**kw):
    torch.manual_seed(0)
    return VectorQuantizer(**{"codebook_size": 7, "dim": 5, **kw})


def test_distances_and_nearest_codes_equal_brute_force():
    torch.manual_seed(1)
    z, e = torch.randn(50, 5), torch.randn(7, 5)
    brute = ((z[:, None, :] - e[None, :, :]) ** 2).sum(-1)
    torch.testing.assert_close(squared_distances(z, e), brute, atol=1e-5, rtol=1e-5)
    vq = _vq().eval()
    x = torch.randn(4, 6, 5)
    q, idx, _, _ = vq(x)
    brute_idx = ((x[..., None, :] - vq.codebook[None, None]) ** 2).sum(-1).argmin(-1)
    assert torch.equal(idx, brute_idx)
    torch.testing.assert_close(q, vq.codebook.detach()[brute_idx])


@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 5), (2, 5, 3, 4)])
def test_shapes_round_trip(shape):
    vq = _vq().eval()
    x = torch.randn(shape)
    q, idx, loss, stats = vq(x)
    assert q.shape == x.shape and loss.ndim == 0
    expect = shape[:-1] if len(shape) < 4 else (shape[0], *shape[2:])
    assert idx.shape == expect
    if len(shape) == 4:  # channel dim 1: the code vector of position (b, h, w)
        torch.testing.assert_close(q[1, :, 2, 3], vq.codebook.detach()[idx[1, 2, 3]])
    assert 1.0 <= float(stats["perplexity"]) <= 7.0


def test_straight_through_gradient_is_identity_and_codebook_gets_only_codebook_loss():
    vq = _vq(beta=0.0)
    x = torch.randn(3, 4, 5, requires_grad=True)
    q, _, _, _ = vq(x)
    g = torch.randn_like(q)
    (q * g).sum().backward()
    torch.testing.assert_close(x.grad, g)  # dL/dz_e = dL/dz_q
    assert vq.codebook.grad is None or torch.count_nonzero(vq.codebook.grad) == 0
    vq.zero_grad()
    x2 = x.detach().clone().requires_grad_(True)
    q, idx, loss, stats = vq(x2)
    loss.backward()  # codebook loss: d/de_k mean((e_k - z)^2) = 2 (e_k - z) / numel
    e = vq.codebook.detach()
    want = torch.zeros_like(e).index_add_(
        0, idx.flatten(), 2 * (e[idx.flatten()] - x2.detach().reshape(-1, 5)) / x2.numel()
    )
    torch.testing.assert_close(vq.codebook.grad, want)


def test_losses_follow_eq3_with_beta():
    vq = _vq(beta=0.25).eval()
    x = torch.randn(8, 5)
    q, _, loss, stats = vq(x)
    mse = ((q.detach() - x) ** 2).mean()
    torch.testing.assert_close(stats["codebook_loss"], mse)
    torch.testing.assert_close(stats["commitment_loss"], mse)
    torch.testing.assert_close(loss, mse * 1.25)
    ema = _vq(beta=0.25, ema=True).eval()
    q, _, loss, _ = ema(x)
    torch.testing.assert_close(loss, 0.25 * ((q.detach() - x) ** 2).mean())
    assert not any(p is ema.codebook for p in ema.parameters())  # EMA codebook: a buffer, no gradient


def test_ema_update_equals_the_hand_computed_formula():
    # K=2, D=1, decay 0.5, eps 0.1: two steps, computed by hand.
    vq = VectorQuantizer(2, 1, ema=True, decay=0.5, eps=0.1)
    vq.codebook.copy_(torch.tensor([[0.0], [10.0]]))
    vq.train()
    vq(torch.tensor([[1.0], [2.0], [9.0]]))
    # step 1: h_N = 0.5 * [2, 1] = [1, .5]; debiased N = [2, 1]; h_m = .5*[3, 9]; m = [3, 9]
    # n = 3, N' = (N + .1) / (3 + .2) * 3 = [2.1, 1.1] * 3 / 3.2; e = m / N'
    n_s = torch.tensor([2.1, 1.1]) * 3 / 3.2
    torch.testing.assert_close(vq.codebook.flatten(), torch.tensor([3.0, 9.0]) / n_s)
    first = vq.codebook.flatten().clone()
    vq(torch.tensor([[0.0], [first[1] + 1]]))  # one vector to each code
    # step 2: h_N = .5*[1, .5] + .5*[1, 1] = [1, .75]; N = h / (1 - .25) = [4/3, 1]
    #         h_m = .5*[1.5, 4.5] + .5*[0, e1 + 1]; m = h_m / .75
    N = torch.tensor([1.0, 0.75]) / 0.75
    m = torch.tensor([0.75, 2.25 + 0.5 * (float(first[1]) + 1)]) / 0.75
    Ns = (N + 0.1) / (N.sum() + 0.2) * N.sum()
    torch.testing.assert_close(vq.codebook.flatten(), m / Ns)
    torch.testing.assert_close(ema_codebook(N, m[:, None], 0.1).flatten(), m / Ns)
    torch.testing.assert_close(laplace_smooth(N, 0.1).sum(), N.sum())


def test_eval_mode_changes_nothing():
    vq = _vq(ema=True, dead_code_threshold=1.0).eval()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(torch.randn(20, 5))
    assert all(torch.equal(before[k], v) for k, v in vq.state_dict().items())


def test_dead_codes_are_restarted_at_encoder_outputs():
    for ema in (False, True):
        vq = _vq(ema=ema, dead_code_threshold=1.0)
        with torch.no_grad():
            vq.codebook.copy_(torch.full((7, 5), 100.0))
            vq.codebook[0] = 0.0  # every input goes to code 0; codes 1..6 are dead
        x = torch.randn(40, 5)
        _, _, _, stats = vq.train()(x)
        assert float(stats["restarted"]) == 6
        cb = vq.codebook.detach()
        for k in range(1, 7):  # each restarted code now sits on one of the batch's vectors
            assert ((x - cb[k]) ** 2).sum(1).min() < 1e-10
        vq.eval()
        _, idx, _, _ = vq(x)
        assert len(idx.unique()) > 1
        no_restart = _vq(ema=ema)
        with torch.no_grad():
            no_restart.codebook.copy_(torch.full((7, 5), 100.0))
            no_restart.codebook[0] = 0.0
        _, _, _, stats = no_restart.train()(x)
        assert float(stats["restarted"]) == 0
        # Without restart an unused code keeps its place (codebook loss), or under the zero-initialised
        # EMA collapses onto the origin (m_i = 0): the codes stay unused either way.
        assert (no_restart.codebook.detach()[1:] == (0.0 if ema else 100.0)).all()


def test_kmeans_init_and_perplexity():
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = centres.repeat(30, 1) + 0.01 * torch.randn(90, 2)
    found = kmeans(x, 3, iters=20, generator=torch.Generator().manual_seed(3))
    # every true centre has a found centre next to it (k-means from 3 distinct random points, 3 tight clusters)
    assert torch.cdist(centres, found).min(1).values.max() < 0.1 or found.unique(dim=0).shape[0] < 3
    vq = VectorQuantizer(3, 2, kmeans_init=True)
    assert not bool(vq.initialized)
    vq.train()(x)
    assert bool(vq.initialized)
    assert torch.cdist(vq.codebook.detach(), x).min(1).values.max() < 1.0  # the codebook moved onto the data
    assert float(perplexity(torch.tensor([5.0, 5.0, 5.0, 5.0]))) == pytest.approx(4.0)
    assert float(perplexity(torch.tensor([9.0, 0.0, 0.0]))) == pytest.approx(1.0)


def test_bad_input():
    with pytest.raises(ConfigError, match="codebook_size"):
        VectorQuantizer(1, 4)
    with pytest.raises(ConfigError, match="decay"):
        VectorQuantizer(4, 4, decay=1.0)
    vq = _vq()
    with pytest.raises(ShapeError, match="dim 5"):
        vq(torch.randn(2, 4, 3, 3))
    with pytest.raises(DataError, match="finite"):
        vq(torch.full((2, 5), float("nan")))
    with pytest.raises(ShapeError, match=r"\[0, 7\)"):
        vq.lookup(torch.tensor([0, 7]))


def test_training_call_returns_the_codes_it_searched_then_updates():
    for ema in (False, True):
        vq = _vq(ema=ema, dead_code_threshold=5.0).train()
        before = vq.codebook.detach().clone()
        x = torch.randn(30, 5)
        q, idx, _, _ = vq(x)
        torch.testing.assert_close(q, before[idx])  # the nearest codes of the codebook searched
        assert torch.equal(idx, ((x[:, None] - before[None]) ** 2).sum(-1).argmin(1))
        assert not torch.equal(vq.codebook.detach(), before)  # then the update (EMA / restarts) ran
