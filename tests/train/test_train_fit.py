import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset, TensorDataset
from train_toys import mse_loss, noisy_loss, toy_data, toy_model

from notelab.core.errors import ConfigError, DataError, ShapeError, TrainingDivergedError
from notelab.train import FitResult, TrainConfig, fit, lr_at, param_groups, plot_history, read_jsonl
from notelab.train.batches import StepBatchSampler, micro_batch_indices


def cfg(**kw) -> TrainConfig:
    base = dict(steps=5, batch_size=8, lr=1e-2, progress=False, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def params_of(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_fit_reduces_loss_and_returns_result():
    data = toy_data(64)
    res = fit(toy_model(), mse_loss, data, cfg(steps=60, log_every=10, lr=3e-2))
    assert isinstance(res, FitResult) and res.step == 60 and res.ema_model is None and res.out_dir is None
    assert res.history[-1]["loss"] < 0.5 * res.history[0]["loss"]
    assert not res.model.training  # handed back ready for evaluation


def test_grad_accumulation_equals_one_big_batch():
    data = toy_data(64)
    a = fit(toy_model(), mse_loss, data, cfg(batch_size=8, grad_accum=2, weight_decay=0.1))
    b = fit(toy_model(), mse_loss, data, cfg(batch_size=16, grad_accum=1, weight_decay=0.1))
    torch.testing.assert_close(params_of(a.model), params_of(b.model), rtol=1e-5, atol=1e-6)
    assert not torch.equal(params_of(a.model), params_of(toy_model()))
    # Adam hides a gradient scale error in the weights; the logged norms show it.
    for ra, rb in zip(a.history, b.history):
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-5)
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)


def test_rank_shards_tile_the_global_batch():
    for m in (0, 3, 7, 11):  # epochs of 64 // 16 = 4 micro-batches, so m wraps into later epochs
        whole = micro_batch_indices(64, m, 16, seed=5)
        shards = [micro_batch_indices(64, m, 8, seed=5, rank=r, world_size=2) for r in range(2)]
        assert torch.equal(torch.cat(shards), whole)
    epoch0 = torch.cat([micro_batch_indices(64, m, 16, seed=5) for m in range(4)])
    assert sorted(epoch0.tolist()) == list(range(64))  # an epoch visits every sample once
    assert not torch.equal(micro_batch_indices(64, 4, 16, seed=5), micro_batch_indices(64, 0, 16, seed=5))


def test_batch_sampler_follows_the_same_order_from_any_start():
    import itertools

    for rank, start in [(0, 0), (1, 0), (1, 5), (0, 9)]:
        sampler = StepBatchSampler(50, start, 4, seed=3, rank=rank, world_size=2)
        got = list(itertools.islice(iter(sampler), 12))  # 50 // 8 = 6 per epoch: crosses epochs
        want = [
            micro_batch_indices(50, m, 4, seed=3, rank=rank, world_size=2).tolist() for m in range(start, start + 12)
        ]
        assert got == want


def test_dataset_and_tensor_give_the_same_training():
    data = toy_data(48)

    class Rows(Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return data[i]

    a = fit(toy_model(), mse_loss, data, cfg(steps=8))
    b = fit(toy_model(), mse_loss, Rows(), cfg(steps=8))
    assert torch.equal(params_of(a.model), params_of(b.model))

    def tuple_loss(model, batch, g):
        x, y = batch
        return ((model(x) - y) ** 2).mean()

    c = fit(toy_model(), tuple_loss, TensorDataset(data[:, :3], data[:, 3:]), cfg(steps=8))
    assert torch.equal(params_of(a.model), params_of(c.model))


def test_callable_data_gets_seeded_generator_and_step():
    seen = []

    def data(step, g):
        seen.append(step)
        return toy_data(8, seed=int(torch.randint(0, 2**31, (1,), generator=g)))

    a = fit(toy_model(), noisy_loss, data, cfg(steps=4, grad_accum=2))
    b = fit(toy_model(), noisy_loss, data, cfg(steps=4, grad_accum=2))
    c = fit(toy_model(), noisy_loss, data, cfg(steps=4, grad_accum=2, seed=1))
    assert seen[:8] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.equal(params_of(a.model), params_of(b.model))
    assert not torch.equal(params_of(a.model), params_of(c.model))


def test_jsonl_log_contents(tmp_path):
    losses = []
    res = fit(
        toy_model(),
        noisy_loss,
        toy_data(64),
        cfg(steps=5, log_every=2, warmup_steps=2, out_dir=str(tmp_path)),
        callbacks=[lambda step, logs: losses.append(logs["loss"])],
    )
    records = read_jsonl(tmp_path / "log.jsonl")
    assert records == json.loads(json.dumps(res.history))
    assert [r["step"] for r in records] == [2, 4, 5]  # every log_every steps and the last one
    for r in records:
        assert {"step", "loss", "lr", "grad_norm", "seconds", "samples_per_s", "pred_mean"} <= set(r)
        assert r["samples_per_s"] > 0 and r["grad_norm"] > 0
    assert records[0]["loss"] == pytest.approx(sum(losses[:2]) / 2)  # mean over the interval
    assert records[2]["loss"] == pytest.approx(losses[4])
    assert records[1]["lr"] == pytest.approx(lr_at(3, cfg(steps=5, warmup_steps=2)))
    assert records[0]["seconds"] <= records[1]["seconds"] <= records[2]["seconds"]
    png = plot_history(tmp_path / "log.jsonl", tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_history(res.history, tmp_path / "again.png").stat().st_size > 1000
    with pytest.raises(DataError, match="loss"):
        plot_history([], tmp_path / "empty.png")


def test_token_throughput_logged_for_integer_batches():
    emb = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(24, 1))

    def data(step, g):
        return torch.randint(0, 10, (4, 6), generator=g)

    res = fit(emb, lambda m, b, g: m(b).pow(2).mean(), data, cfg(steps=2))
    assert res.history[-1]["tokens_per_s"] == pytest.approx(res.history[-1]["samples_per_s"] * 6)
    assert "max_memory_gb" not in res.history[-1]  # the CUDA allocator's peak: logged on CUDA only


def test_ema_tracks_the_weights():
    decay = 0.8
    model = toy_model()
    ema = params_of(model)
    steps = []
    res = fit(
        model,
        mse_loss,
        toy_data(),
        cfg(steps=6, ema_decay=decay),
        callbacks=[lambda s, _: steps.append(params_of(model))],
    )
    for w in steps:
        ema = decay * ema + (1 - decay) * w
    torch.testing.assert_close(params_of(res.ema_model), ema)
    assert not torch.allclose(params_of(res.ema_model), params_of(res.model))


def test_no_weight_decay_on_norms_and_biases():
    groups = param_groups(toy_model(), 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and all(p.dim() == 1 for p in groups[1]["params"])


def test_lr_fn_overrides_schedule():
    seen = []
    fit(
        toy_model(),
        mse_loss,
        toy_data(),
        cfg(steps=4, lr=2.0),
        lr_fn=lambda s: 1.0 / (s + 1),
        callbacks=[lambda s, logs: seen.append(logs["lr"])],
    )
    assert seen == pytest.approx([2.0, 1.0, 2 / 3, 0.5])


def test_nan_loss_stops_with_step_and_last_good_checkpoint(tmp_path):
    def data(step, g):
        return torch.full((8, 4), math.nan) if step == 5 else toy_data(8, seed=step)

    with pytest.raises(TrainingDivergedError) as err:
        fit(toy_model(), mse_loss, data, cfg(steps=10, ckpt_every=2, out_dir=str(tmp_path)))
    msg = str(err.value)
    assert "step 6" in msg and "nan" in msg and str(tmp_path / "checkpoint") in msg and "(step 4)" in msg
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 4  # the good checkpoint is left as it was


def test_infinite_grad_norm_with_finite_loss_is_caught():
    def loss_fn(model, batch, g):
        w = next(model.parameters())
        kink = torch.sqrt((w - w.detach()).pow(2).sum())  # value 0, gradient inf
        return mse_loss(model, batch, g) + kink

    with pytest.raises(TrainingDivergedError, match="step 1: non-finite grad norm"):
        fit(toy_model(), loss_fn, toy_data(), cfg(steps=3))


class IterableRows(IterableDataset):
    def __iter__(self):
        return iter(toy_data())


def test_bad_inputs():
    with pytest.raises(ShapeError, match="scalar"):
        fit(toy_model(), lambda m, b, g: m(b[:, :3]), toy_data(), cfg(steps=1))
    with pytest.raises(ConfigError, match="callable data"):
        fit(toy_model(), mse_loss, [toy_data()], cfg(steps=1))
    with pytest.raises(ConfigError, match="map-style"):
        fit(toy_model(), mse_loss, IterableRows(), cfg(steps=1))
    with pytest.raises(DataError, match="at least"):
        fit(toy_model(), mse_loss, toy_data(4), cfg(steps=1, batch_size=8))
