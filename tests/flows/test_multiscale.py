"""RealNVP's multi-scale image flow: squeeze, image masks, conv couplings, factor-out.

Invertibility, log-det against the autograd Jacobian on a tiny image, the exact parameter count,
and training on the embedded digits through ``train_flow`` (``fit``)."""

import pytest
import torch

from notelab.core.errors import ConfigError, ShapeError
from notelab.data import load_dataset
from notelab.flows import (
    Affine,
    Coupling,
    CouplingFlow,
    CouplingFlowConfig,
    MultiScale,
    Squeeze,
    channel_mask,
    checkerboard_mask,
    resnet,
)
from notelab.flows.train import FlowSpec, build_model, evaluate, load_flow, train_flow
from notelab.train import TrainConfig


def _flow(shape, n_scales, norm="actnorm", scale=0.1, dtype=torch.float64, seed=0):
    config = CouplingFlowConfig.from_name(
        "realnvp", sample_shape=shape, hidden=4, depth=1, arch="multiscale", n_scales=n_scales, norm=norm
    )
    flow = CouplingFlow(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-trivial weights: the last conv of each conditioner starts at zero
        for p in flow.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))
    return flow.to(dtype).eval()


def test_squeeze_moves_each_2x2_block_into_channels_and_back():
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(1, 2, 4, 6)
    y, ladj = Squeeze()(x)
    assert y.shape == (1, 8, 2, 3) and torch.equal(ladj, torch.zeros(1))
    # channel 4c + 2i + j of block (a, b) holds pixel (2a + i, 2b + j) of channel c
    for c, i, j, a, b in [(0, 0, 0, 0, 0), (1, 1, 0, 1, 2), (0, 1, 1, 1, 1), (1, 0, 1, 0, 2)]:
        assert y[0, 4 * c + 2 * i + j, a, b] == x[0, c, 2 * a + i, 2 * b + j]
    assert torch.equal(Squeeze().inverse(y), x)
    assert torch.equal(y.flatten().sort().values, x.flatten())  # a permutation


def test_masks_are_complementary_and_have_the_paper_pattern():
    shape = (4, 4, 4)
    for make in (checkerboard_mask, channel_mask):
        m0, m1 = make(shape, 0), make(shape, 1)
        assert m0.shape == shape and torch.equal(m0 + m1, torch.ones(shape))
    cb = checkerboard_mask(shape, 0)
    assert cb[0, 0, 0] == 1 and cb[0, 0, 1] == 0 and cb[0, 1, 0] == 0 and cb[0, 1, 1] == 1
    assert torch.equal(cb[0], cb[3])
    ch = channel_mask(shape, 0)
    assert torch.equal(ch[:2], torch.ones(2, 4, 4)) and torch.equal(ch[2:], torch.zeros(2, 4, 4))


def test_image_coupling_keeps_the_masked_pixels_and_is_the_identity_at_init():
    shape = (2, 4, 4)
    mask = checkerboard_mask(shape, 1)
    f = Coupling(mask, transform=Affine, net=lambda i, o: resnet(i, o, hidden=4, depth=1)).double()
    x = torch.randn(3, *shape, dtype=torch.float64)
    y, ladj = f(x)
    assert torch.equal(y, x) and torch.equal(ladj, torch.zeros(3, dtype=torch.float64))
    with torch.no_grad():
        for p in f.parameters():
            p.add_(0.2 * torch.randn_like(p))
    y, _ = f(x)
    keep = mask.bool().expand_as(x)
    assert torch.equal(y[keep], x[keep]) and not torch.allclose(y[~keep], x[~keep])


@pytest.mark.parametrize("shape, n_scales", [((1, 8, 8), 2), ((3, 8, 8), 2), ((1, 4, 4), 1)])
def test_round_trip_float32_to_1e5(shape, n_scales):
    flow = _flow(shape, n_scales, scale=0.05, dtype=torch.float32)
    x = torch.randn(16, *shape, generator=torch.Generator().manual_seed(1))
    z, _ = flow.bijection(x.flatten(1))
    assert (flow.bijection.inverse(z) - x.flatten(1)).abs().max() < 1e-5
    assert (flow.sample(4, generator=torch.Generator().manual_seed(0))).shape == (4, *shape)


def test_log_det_equals_the_autograd_jacobian_on_a_tiny_image():
    """(1, 4, 4): checkerboard couplings, squeeze, channel couplings, factor-out, last couplings; ActNorm."""
    flow = _flow((1, 4, 4), 1)
    assert isinstance(flow.bijection.bijections[0], MultiScale)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y, ladj = flow.bijection(x)
    torch.testing.assert_close(flow.bijection.inverse(y), x, atol=1e-10, rtol=0)
    want = torch.stack(
        [
            torch.linalg.slogdet(torch.autograd.functional.jacobian(lambda r: flow.bijection(r[None])[0][0], r))[1]
            for r in x
        ]
    )
    torch.testing.assert_close(ladj, want, atol=1e-9, rtol=0)
    assert float(ladj.detach().abs().min()) > 1e-3  # the test has a log-det to get wrong


@pytest.mark.parametrize("norm", ["none", "actnorm"])
def test_num_parameters_formula(norm):
    config = CouplingFlowConfig.from_name(
        "realnvp", sample_shape=(3, 8, 8), hidden=6, depth=2, arch="multiscale", norm=norm
    )
    assert CouplingFlow.num_parameters(config) == sum(p.numel() for p in CouplingFlow(config).parameters())


def test_shapes_that_do_not_halve_are_refused():
    with pytest.raises(ConfigError, match=r"divisible by 2\*\*n_scales = 4, got sample_shape \(1, 6, 6\)"):
        CouplingFlowConfig.from_name("realnvp", sample_shape=(1, 6, 6), arch="multiscale", n_scales=2)
    with pytest.raises(ConfigError, match="sample_shape \\(64,\\)"):
        CouplingFlowConfig.from_name("realnvp", sample_shape=(64,), arch="multiscale")
    with pytest.raises(ConfigError, match="unknown arch"):
        CouplingFlowConfig(arch="glow")
    with pytest.raises(ConfigError, match="applies to nice and realnvp"):
        FlowSpec(model="fm", arch="multiscale")
    flow = _flow((1, 4, 4), 1, dtype=torch.float32)
    with pytest.raises(ShapeError, match=r"expected x of shape \(B, 1, 4, 4\), got \(2, 1, 8, 8\)"):
        flow.log_prob(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ShapeError, match="finite"):
        flow.log_prob(torch.full((2, 1, 4, 4), float("nan")))
    with pytest.raises(ConfigError, match="n >= 1"):
        flow.sample(0)


def test_auto_arch_is_multiscale_for_realnvp_on_images_only():
    spec = FlowSpec(model="realnvp", hidden=4, depth=1)
    assert build_model(spec, (1, 8, 8)).config.arch == "multiscale"
    assert build_model(spec, (1, 8, 8)).config.n_scales == 2
    assert build_model(spec, (1, 6, 6)).config.n_scales == 1
    assert build_model(spec, (2,)).config.arch == "mlp"
    assert build_model(FlowSpec(model="nice", hidden=4, depth=1), (1, 8, 8)).config.arch == "mlp"


def test_training_on_digits_lowers_bits_per_dim_and_reloads(tmp_path):
    digits = load_dataset("digits", split="train").x[:256]
    test = load_dataset("digits", split="test").x[:128]
    spec = FlowSpec(model="realnvp", n_bins=17, hidden=8, depth=1)
    torch.manual_seed(0)
    before = evaluate(build_model(spec, (1, 8, 8)).eval(), test, n_bins=17)["bits_per_dim"]
    config = TrainConfig(steps=25, batch_size=64, lr=3e-3, progress=False, log_every=1000, compile=False)
    model, _ = train_flow(spec, digits, config, out_dir=tmp_path)
    after = evaluate(model, test, n_bins=17)["bits_per_dim"]
    assert after < before - 0.3, (before, after)
    again, spec2 = load_flow(tmp_path)
    assert spec2 == spec and again.config.arch == "multiscale"
    torch.testing.assert_close(again.log_prob(test[:4] * 0.99), model.log_prob(test[:4] * 0.99))


def test_per_channel_actnorm_normalises_each_channel_over_batch_and_pixels():
    from notelab.flows import ActNorm

    f = ActNorm((2, 1, 1)).train()
    x = torch.randn(16, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * torch.tensor([3.0, 0.5]).view(1, 2, 1, 1)
    x = x + torch.tensor([1.0, -2.0]).view(1, 2, 1, 1)
    y, ladj = f(x)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std((0, 2, 3)), torch.ones(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(ladj, (16 * f.log_scale.sum()).expand(16))  # H W sum_c s_c
    torch.testing.assert_close(f.inverse(y), x, atol=1e-5, rtol=0)
