import pytest
import torch

from notelab.core.denoisers import MLPDenoiser, MLPDenoiserConfig, UNet, UNetConfig
from notelab.core.ema import EMA
from notelab.core.embeddings import sinusoidal_embedding
from notelab.core.errors import ConfigError, ShapeError, unknown_name
from notelab.core.runtime import autocast_dtype, get_device
from notelab.core.tensor import append_dims


def test_append_dims():
    assert append_dims(torch.ones(3), 4).shape == (3, 1, 1, 1)
    assert append_dims(torch.ones(3), 1).shape == (3,)
    with pytest.raises(ValueError):
        append_dims(torch.ones(3, 2), 1)


def test_sinusoidal_embedding_values():
    e = sinusoidal_embedding(torch.tensor([0.0, 3.0]), 8)
    assert torch.allclose(e[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 4)
    assert torch.allclose(e[1, :4], torch.sin(3 * freqs)) and torch.allclose(e[1, 4:], torch.cos(3 * freqs))


def test_ema_closed_form():
    m = torch.nn.Linear(2, 2)
    with torch.no_grad():
        m.weight.fill_(0.0)
    ema = EMA(m, decay=0.9)
    with torch.no_grad():
        m.weight.fill_(1.0)
    for _ in range(5):
        ema.update(m)
    assert torch.allclose(ema.model.weight, torch.full((2, 2), 1 - 0.9**5))
    assert not ema.model.weight.requires_grad


def test_denoisers_shapes_and_errors():
    u = UNet(UNetConfig(image_size=8, base_channels=16, channel_mults=(1, 2), num_res_blocks=1))
    x = torch.randn(2, 1, 8, 8)
    assert u(x, torch.tensor([3, 900])).shape == x.shape
    with pytest.raises(ShapeError, match=r"expected x of shape \(B, 1, 8, 8\), got \(2, 1, 9, 9\)"):
        u(torch.randn(2, 1, 9, 9), torch.tensor([1, 2]))
    m = MLPDenoiser(MLPDenoiserConfig(dim=2, hidden=32, n_layers=2))
    assert m(torch.randn(5, 2), torch.tensor(7)).shape == (5, 2)
    with pytest.raises(ShapeError):
        m(torch.randn(5, 3), torch.tensor(7))
    with pytest.raises(ValueError, match="divisible"):
        UNetConfig(image_size=9, channel_mults=(1, 2))


def test_runtime_helpers():
    assert get_device("cpu").type == "cpu"
    assert autocast_dtype(torch.device("cpu")) is None
    assert autocast_dtype(torch.device("cuda")) is torch.bfloat16
    with pytest.raises(ConfigError, match="unknown precision 'fp8'"):
        autocast_dtype(torch.device("cpu"), "fp8")
    assert str(unknown_name("dataset", "x", ["b", "a"])) == "unknown dataset 'x'; known: a, b"
