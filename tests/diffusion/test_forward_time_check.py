"""DiffusionModel.forward range-checks its time input where that is free (CPU tensors, numbers), and
never reads a device tensor back to the host (no per-step sync) or breaks a torch.compile graph."""

from __future__ import annotations

import math

import pytest
import torch

from notelab.core.errors import ConfigError, ShapeError
from notelab.diffusion.pipeline import DiffusionConfig, DiffusionModel, check_time_input

T = 50


def _model(sde: str = "none") -> DiffusionModel:
    torch.manual_seed(0)
    config = DiffusionConfig(
        sample_shape=(2,), net="mlp", net_config={"hidden": 16, "n_layers": 1, "time_dim": 8}, num_train_timesteps=T,
        sde=sde,
    )  # fmt: skip
    return DiffusionModel(config)


@pytest.mark.parametrize(
    "t, match",
    [
        (torch.tensor([0, T]), f"got 0..{T}"),  # one past the last timestep: was an unchecked embedding
        (torch.tensor([-1, 3]), "got -1..3"),
        (torch.tensor([0.5, float(T)]), f"got 0.5..{T}"),
        (torch.tensor([1.0, math.nan]), "nan"),
        (torch.tensor([True, False]), "dtype torch.bool"),
    ],
)
def test_out_of_range_time_is_one_line_error(t, match):
    with pytest.raises(ShapeError, match=match) as e:
        _model()(torch.zeros(2, 2), t)
    assert "\n" not in str(e.value) and f"{T}" in str(e.value)


def test_numbers_are_checked_too():
    for bad in (T, -1, float(T), -0.5):
        with pytest.raises((ShapeError, ConfigError), match="DiffusionModel: "):
            check_time_input(bad, T)
    check_time_input(T - 1, T)
    check_time_input(T - 1.0, T)


def test_in_range_integer_and_float_labels_pass():
    model = _model()
    x = torch.zeros(3, 2)
    assert model(x, torch.tensor([0, 7, T - 1])).shape == (3, 2)
    assert model(x, torch.tensor([0.0, 12.5, T - 1.0])).shape == (3, 2)  # an SDE model's t (N - 1) / T


def test_sde_training_passes_its_float_labels():
    """Continuous score matching calls the model with time_label(t) = t (N - 1) / T for t in [eps, T]."""
    loss = _model("vp").loss(torch.randn(16, 2), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


def test_device_tensors_are_not_read_back():
    """A non-CPU tensor is left alone (reading its min / max would be a host sync on every step): on
    the meta device any read would raise, so passing proves none happens."""
    check_time_input(torch.full((4,), 10 * T, device="meta"), T)
    check_time_input(torch.full((4,), 10.0 * T, device="meta"), T)
    with pytest.raises(ShapeError, match="dtype"):  # metadata is still checked
        check_time_input(torch.zeros(4, dtype=torch.bool, device="meta"), T)


def test_no_graph_break_under_torch_compile():
    def f(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        check_time_input(t, T)
        return x * t

    compiled = torch.compile(f, backend="eager", fullgraph=True)  # fullgraph: a graph break would raise
    out = compiled(torch.ones(3), torch.tensor([1, 2, 3]))
    assert out.tolist() == [1.0, 2.0, 3.0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_does_not_sync():
    model = _model().cuda()
    x, t = torch.zeros(4, 2, device="cuda"), torch.randint(0, T, (4,), device="cuda")
    torch.cuda.set_sync_debug_mode("error")  # any host sync raises
    try:
        model(x, t)
    finally:
        torch.cuda.set_sync_debug_mode("default")
