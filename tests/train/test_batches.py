"""Gradient accumulation k x b draws the samples of one batch of k * b, whatever the data size."""

import itertools

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset
from train_toys import mse_loss, toy_data, toy_model

from notelab.core.errors import DataError
from notelab.train import TrainConfig, fit
from notelab.train.batches import StepBatchSampler, micro_batch_indices


def params_of(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def run(data, batch_size: int, grad_accum: int):
    cfg = TrainConfig(
        steps=8, batch_size=batch_size, grad_accum=grad_accum, lr=1e-2, weight_decay=0.1, progress=False, log_every=1
    )
    return fit(toy_model(), mse_loss, data, cfg)


class Rows(Dataset):
    def __init__(self, data: torch.Tensor) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]


@pytest.mark.parametrize("as_dataset", [False, True])
@pytest.mark.parametrize(("batch_size", "grad_accum"), [(4, 2), (5, 3), (4, 3)])
def test_accumulation_equals_one_big_batch_on_an_awkward_data_size(as_dataset, batch_size, grad_accum):
    # 37 rows with b = 4, k = 2: 37 // 8 = 4 steps per epoch but 37 // 4 = 9 micro-batches, so
    # epochs counted in micro-batches would end inside step 4 and mix two epochs' samples.
    data = toy_data(37)
    data = Rows(data) if as_dataset else data
    a = run(data, batch_size=batch_size, grad_accum=grad_accum)
    b = run(data, batch_size=batch_size * grad_accum, grad_accum=1)
    torch.testing.assert_close(params_of(a.model), params_of(b.model), rtol=0, atol=1e-6)
    for ra, rb in zip(a.history, b.history, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-5)


def test_micro_batches_and_ranks_tile_the_step_batch():
    n, b, k, w = 37, 2, 3, 2
    for step in range(7):  # 37 // 12 = 3 steps per epoch
        whole = micro_batch_indices(n, step, b * k * w, seed=4)
        parts = [
            micro_batch_indices(n, step * k + a, b, seed=4, rank=r, world_size=w, grad_accum=k)
            for a in range(k)
            for r in range(w)
        ]
        assert torch.equal(torch.cat(parts), whole)


def test_sampler_follows_micro_batch_indices_with_accumulation():
    for rank, start in [(0, 0), (1, 4), (0, 9)]:
        sampler = StepBatchSampler(37, start, 2, seed=4, rank=rank, world_size=2, grad_accum=3)
        got = list(itertools.islice(iter(sampler), 20))
        want = [micro_batch_indices(37, m, 2, 4, rank, 2, 3).tolist() for m in range(start, start + 20)]
        assert got == want


def test_data_smaller_than_one_step_is_an_error():
    with pytest.raises(DataError, match="batch_size x world_size x grad_accum = 12 samples for one step, got 10"):
        run(toy_data(10), batch_size=4, grad_accum=3)
