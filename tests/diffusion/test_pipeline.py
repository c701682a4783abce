"""DiffusionModel / DiffusionConfig / train_diffusion: the model directory, sampling, training end to end."""

from __future__ import annotations

import json

import pytest
import torch

from notelab.core.errors import CheckpointError, ConfigError, ShapeError
from notelab.diffusion.pipeline import (
    DiffusionConfig,
    DiffusionModel,
    default_net_config,
    sampling_setup,
    train_diffusion,
)

TINY_MLP = {"hidden": 32, "n_layers": 2, "time_dim": 16}
TINY_UNET = {"base_channels": 8, "channel_mults": (1, 2), "num_res_blocks": 1, "attn_heads": 2, "groups": 4}


def tiny_points_model(T: int = 50) -> DiffusionModel:
    torch.manual_seed(0)
    return DiffusionModel(DiffusionConfig(sample_shape=(2,), net="mlp", net_config=TINY_MLP, num_train_timesteps=T))


def tiny_image_model(T: int = 50) -> DiffusionModel:
    torch.manual_seed(0)
    return DiffusionModel(DiffusionConfig(sample_shape=(1, 8, 8), net_config=TINY_UNET, num_train_timesteps=T))


def test_for_shape_picks_mlp_for_points_and_unet_for_images():
    points = DiffusionConfig.for_shape((2,))
    images = DiffusionConfig.for_shape((3, 16, 16))
    assert points.net == "mlp" and points.net_config["dim"] == 2
    assert images.net == "unet"
    assert images.net_config["in_channels"] == 3 and images.net_config["image_size"] == 16
    # every level halves the map: a 16x16 image gets one more level than an 8x8 one
    assert (
        len(default_net_config((1, 16, 16))["channel_mults"]) == len(default_net_config((1, 8, 8))["channel_mults"]) + 1
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"net": "transformer"}, "unknown net"),
        ({"prediction_type": "score"}, "unknown prediction_type"),
        ({"beta_schedule": "sigmoid"}, "unknown beta_schedule"),
        ({"variance_type": "learned"}, "unknown variance_type"),
        ({"num_train_timesteps": 0}, "num_train_timesteps"),
        ({"net_config": {"in_channels": 3}}, "in_channels"),
        ({"sample_shape": (1, 8, 6)}, "square"),
        ({"net": "mlp"}, "expected sample_shape"),
        ({"net_config": {"no_such_field": 1}}, "no_such_field"),
    ],
)
def test_bad_config_is_a_one_line_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match) as info:
        DiffusionModel(DiffusionConfig(**kwargs))
    assert "\n" not in str(info.value)


def test_save_and_load_round_trip(tmp_path):
    model = tiny_image_model()
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "ddpm" and data["sample_shape"] == [1, 8, 8]
    loaded = DiffusionModel.from_pretrained(tmp_path)
    assert loaded.config == model.config
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 10, 49])
    torch.testing.assert_close(loaded(x, t), model(x, t))
    # the schedule is derived from the config, not stored with the weights
    assert not any("schedule" in k or "alphas" in k for k in loaded.state_dict())
    torch.testing.assert_close(loaded.schedule.alphas_cumprod, model.schedule.alphas_cumprod)


def test_weights_that_do_not_match_the_config_are_a_checkpoint_error(tmp_path):
    tiny_image_model().save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["net_config"]["base_channels"] = 16
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="do not match"):
        DiffusionModel.from_pretrained(tmp_path)


def test_truncated_weights_are_a_checkpoint_error(tmp_path):
    tiny_image_model().save_pretrained(tmp_path)
    w = tmp_path / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        DiffusionModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("sampler, steps", [("ddim", 10), ("ddpm", 50)])
def test_sample_shape_and_seed_reproducibility(sampler, steps):
    model = tiny_image_model()
    a = model.sample(4, sampler=sampler, steps=steps, eta=1.0, generator=torch.Generator().manual_seed(3))
    b = model.sample(4, sampler=sampler, steps=steps, eta=1.0, generator=torch.Generator().manual_seed(3))
    c = model.sample(4, sampler=sampler, steps=steps, eta=1.0, generator=torch.Generator().manual_seed(4))
    assert a.shape == (4, 1, 8, 8) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_ddim_eta0_is_a_deterministic_map_of_the_initial_noise():
    model = tiny_points_model()
    x_T = torch.randn(16, 2)
    a = model.sample(16, steps=10, eta=0.0, x_T=x_T, generator=torch.Generator().manual_seed(0))
    b = model.sample(16, steps=10, eta=0.0, x_T=x_T, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    # the DDIM chain with all T steps and eta=1 is DDPM's ancestral chain: same noise, same samples
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    ddpm = model.sample(16, sampler="ddpm", x_T=x_T, generator=g1)
    ddim = model.sample(16, sampler="ddim", steps=50, eta=1.0, x_T=x_T, generator=g2)
    torch.testing.assert_close(ddim, ddpm, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("steps", [0, 51, -1])
def test_steps_outside_1_to_T_are_rejected(steps):
    with pytest.raises(ConfigError, match="steps: expected 1..50"):
        tiny_points_model().sample(2, steps=steps)


def test_bad_sampler_and_noise_shape_are_rejected():
    model = tiny_points_model()
    with pytest.raises(ConfigError, match="unknown sampler"):
        model.sample(2, sampler="euler")
    with pytest.raises(ShapeError, match="x_T"):
        model.sample(2, x_T=torch.randn(3, 2))


def test_sample_leaves_the_training_mode_as_it_was():
    model = tiny_points_model().train()
    model.sample(2, steps=2)
    assert model.training


def test_sampling_setup_is_bf16_and_compiled_on_cuda_and_float32_eager_on_cpu():
    # a torch.device("cuda") object needs no GPU: the choice is a pure function of the device type
    assert sampling_setup(torch.device("cuda")) == (torch.bfloat16, True)
    assert sampling_setup(torch.device("cuda", 1)) == (torch.bfloat16, True)
    assert sampling_setup(torch.device("cpu")) == (None, False)
    assert sampling_setup(torch.device("cuda"), "fp32", False) == (None, False)
    assert sampling_setup(torch.device("cpu"), "bf16", True) == (torch.bfloat16, True)
    with pytest.raises(ConfigError, match="compile: expected 'auto', True or False"):
        sampling_setup(torch.device("cpu"), "auto", "yes")
    with pytest.raises(ConfigError, match="precision"):
        sampling_setup(torch.device("cpu"), "int8")


def _watch_network(model):
    seen = []

    def hook(module, args, out):
        seen.append((torch.is_autocast_enabled("cpu"), out.dtype))

    return seen, model.net.register_forward_hook(hook)


def test_sample_defaults_on_cpu_run_the_eager_network_in_float32():
    model = tiny_image_model()
    seen, handle = _watch_network(model)
    x = model.sample(2, steps=3, generator=torch.Generator().manual_seed(0))
    handle.remove()
    assert seen == [(False, torch.float32)] * 3
    assert x.dtype == torch.float32 and "_compiled_net" not in model.__dict__


def test_sample_in_bf16_autocasts_the_network_and_returns_float32_close_to_fp32():
    model = tiny_image_model()
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    seen, handle = _watch_network(model)
    low = model.sample(4, steps=5, x_T=x_T, precision="bf16")
    handle.remove()
    assert seen == [(True, torch.bfloat16)] * 5
    full = model.sample(4, steps=5, x_T=x_T, precision="fp32")
    assert low.dtype == torch.float32
    # bf16 keeps ~3 significant digits per network call; five DDIM steps stay close to the fp32 chain
    assert (low - full).abs().max() < 0.05 * full.abs().max()
    assert not torch.equal(low, full)


def test_train_diffusion_writes_a_loadable_run_with_the_ema_weights(tmp_path):
    from notelab.data import load_dataset
    from notelab.train import TrainConfig
    from notelab.train.state import EMA_FILE, load_weights

    dataset = load_dataset("moons")
    config = DiffusionConfig(sample_shape=(2,), net="mlp", net_config=TINY_MLP, num_train_timesteps=100)
    train_config = TrainConfig(steps=60, batch_size=64, lr=3e-3, ema_decay=0.9, log_every=5, progress=False)
    out = tmp_path / "run"
    model = train_diffusion(dataset, out, train_config, config)
    for name in ("config.json", "model.safetensors", "log.jsonl", "loss.png"):
        assert (out / name).is_file(), name
    loaded = DiffusionModel.from_pretrained(out)
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, model.state_dict()[k])
    ema = load_weights(out / "checkpoint" / EMA_FILE)
    torch.testing.assert_close(loaded.state_dict()["net.out.weight"], ema["net.out.weight"])
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    x = loaded.sample(32, steps=20, generator=torch.Generator().manual_seed(0))
    assert x.shape == (32, 2) and torch.isfinite(x).all()


def test_train_diffusion_rejects_a_config_for_other_data(tmp_path):
    from notelab.data import load_dataset
    from notelab.train import TrainConfig

    with pytest.raises(ConfigError, match="sample_shape"):
        train_diffusion(load_dataset("moons"), tmp_path / "run", TrainConfig(steps=1), DiffusionConfig())
    assert not (tmp_path / "run").exists()
