"""VQVAE (encode / decode / save / train through fit) and the Llama prior over its codes."""

import math

import pytest
import torch
import torch.nn.functional as F

from notelab.core.errors import ConfigError, DataError, ShapeError
from notelab.data import load_dataset
from notelab.train import TrainConfig
from notelab.vq import (
    VQVAE,
    VQVAEConfig,
    bits_per_dim_bound,
    code_nll,
    code_sequences,
    encode_dataset,
    evaluate,
    fit_vqvae,
    prior_bits_per_dim,
    sample_codes,
    train_prior,
)
from notelab.vq.prior import gaussian_log_likelihood

TINY = {"hidden": 16, "res_blocks": 1, "code_dim": 4, "codebook_size": 8}


def _model(**kw):
    torch.manual_seed(0)
    return VQVAE(VQVAEConfig(**{**TINY, **kw}))


@pytest.mark.parametrize("downsample", [1, 2, 4])
def test_encode_decode_equal_forward(downsample):
    m = _model(downsample=downsample, in_channels=3, image_size=8).eval()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    x_hat, idx, _, _ = m(x)
    codes = m.encode(x)
    assert codes.shape == (2, 8 // downsample, 8 // downsample) and torch.equal(codes, idx)
    torch.testing.assert_close(m.decode(codes), x_hat)


def test_save_load_round_trip(tmp_path):
    m = _model(ema=True, dead_code_threshold=1.0)
    m.train()(torch.rand(4, 1, 8, 8))  # moves the EMA buffers away from their initial values
    m.eval().save_pretrained(tmp_path)
    back = VQVAE.from_pretrained(tmp_path).eval()
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(back.encode(x), m.encode(x))
    torch.testing.assert_close(back(x)[0], m(x)[0])
    assert int(back.quantizer.steps) == 1


def test_bad_input():
    with pytest.raises(ConfigError, match="codebook_size"):
        VQVAEConfig(codebook_size=1)
    with pytest.raises(ConfigError, match="power of 2"):
        VQVAEConfig(downsample=3)
    m = _model()
    with pytest.raises(ShapeError, match=r"\(B, 1, H, W\)"):
        m(torch.rand(2, 3, 8, 8))
    with pytest.raises(DataError, match="finite"):
        m(torch.full((1, 1, 8, 8), float("inf")))
    with pytest.raises(ShapeError, match=r"\[0, 8\)"):
        m.decode(torch.full((1, 4, 4), 8))
    with pytest.raises(ShapeError, match="integer"):
        m.decode(torch.zeros(1, 4, 4))


def test_fit_trains_on_digits_and_the_prior_learns_the_codes():
    train, test = load_dataset("digits").split()
    tc = TrainConfig(steps=100, batch_size=32, lr=5e-3, progress=False, device="cpu", log_every=1000)
    m = fit_vqvae(train.x, VQVAEConfig(**TINY, ema=True, dead_code_threshold=1.0), tc).model
    scores = evaluate(m, test.x)
    assert scores["mse"] < 0.5 * float(test.x.var())  # far better than the mean image
    codes, test_codes = encode_dataset(m, train.x), encode_dataset(m, test.x)
    val = codes[:100]
    tc = TrainConfig(steps=40, batch_size=64, lr=3e-3, progress=False, device="cpu")
    result = train_prior(codes[100:], 8, tc, val_codes=val, eval_every=10)
    prior = result.model
    curve = [r["val_nll"] for r in result.history if "val_nll" in r]
    assert len(curve) == 4  # steps 10, 20, 30, 40; the weights returned are those of the best
    assert float(code_nll(prior, val, 8).mean()) == pytest.approx(min(curve), rel=1e-5)
    nll = code_nll(prior, test_codes, 8)
    # per code, against the uniform prior's log K nats; and against a direct evaluation of the logits
    assert float(nll.mean()) / 16 < math.log(8)
    rows = code_sequences(test_codes[:3], 8)
    logp = F.log_softmax(prior(rows[:, :-1]).float(), -1).gather(2, rows[:, 1:, None]).sum((1, 2))
    torch.testing.assert_close(nll[:3], -logp)
    assert prior_bits_per_dim(nll, 64) == pytest.approx(float(nll.mean()) / (64 * math.log(2)))
    samples = sample_codes(prior, 5, (4, 4), 8, top_k=4, seed=1)
    assert samples.shape == (5, 4, 4) and int(samples.max()) < 8
    assert m.decode(samples).shape == (5, 1, 8, 8)


def test_bits_per_dim_bound_is_the_papers_formula():
    torch.manual_seed(0)
    x, x_hat = torch.rand(4, 1, 2, 2), torch.rand(4, 1, 2, 2)
    nll = torch.rand(4) * 5
    var = 0.1
    by_hand = []
    for i in range(4):
        normal = torch.distributions.Normal(x_hat[i].flatten(), math.sqrt(var))
        log_p = normal.log_prob(x[i].flatten()).sum() - nll[i]
        by_hand.append(float(-(log_p + 4 * math.log(2 / 256)) / (4 * math.log(2))))
    assert bits_per_dim_bound(x, x_hat, nll, var) == pytest.approx(sum(by_hand) / 4, rel=1e-5)
    torch.testing.assert_close(
        gaussian_log_likelihood(x, x_hat, var),
        torch.distributions.Normal(x_hat, math.sqrt(var)).log_prob(x).flatten(1).sum(1),
    )
