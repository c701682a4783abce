"""Where each micro-batch comes from: a pure function of (seed, step, micro-batch, rank).

Nothing here keeps state between steps, so a run resumed at step ``k`` draws exactly the batches
and random numbers an uninterrupted run draws from step ``k`` on, without saving any RNG state.

For a map-style data set (or a tensor, whose rows are the samples), micro-batch ``a`` of
optimizer step ``s`` takes its ``B`` samples from the step's ``S = B * world_size * grad_accum``::

    epoch, j = divmod(s, N // S)          # the last partial step of an epoch is dropped
    perm     = randperm(N, seed=(seed, epoch))
    rank r takes perm[j * S + (a * world_size + r) * B :][:B]

so the ranks and micro-batches of a step together see exactly the samples of one process with
batch ``S`` and no accumulation, whatever ``N`` is (epochs are counted in steps, not micro-batches).
The global micro-batch index ``m = s * grad_accum + a`` names the pair (s, a).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler
from torch.utils.data._utils.collate import default_collate

from notelab.core.errors import ConfigError, DataError

DataFn = Callable[[int, torch.Generator], Any]

# Separate streams so that the data and the loss never draw the same random numbers.
STREAM_DATA, STREAM_LOSS, STREAM_GLOBAL, STREAM_EPOCH = 0, 1, 2, 3


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, the same in every process (unlike ``hash``)."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded with ``seed``."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def seed_global_rng(seed: int, device: torch.device) -> None:
    """Seed torch's default generators of the CPU and of ``device`` (dropout draws from them).

    Not ``torch.manual_seed``: on a machine without a GPU it queues one lazy CUDA seeding call
    per use, which a loop calling it every step would pile up.
    """
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Move tensors (and tuples / lists / dicts of them) to ``device``; leave anything else."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return type(batch)({k: to_device(v, device, non_blocking) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(v, device, non_blocking) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, non_blocking) for v in batch)
    return batch


def first_tensor(batch: Any) -> torch.Tensor | None:
    """The first tensor found in a (nested) batch, for counting samples and tokens."""
    if isinstance(batch, torch.Tensor):
        return batch
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for v in values:
        t = first_tensor(v)
        if t is not None:
            return t
    return None


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of ``epoch``: a permutation of ``range(n)`` seeded by (seed, epoch)."""
    return torch.randperm(n, generator=make_generator(derive_seed(seed, STREAM_EPOCH, epoch)))


def micro_batch_indices(
    n: int, m: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, grad_accum: int = 1
) -> torch.Tensor:
    """Sample indices of this rank's share of global micro-batch ``m`` (see the module docstring)."""
    step, micro = divmod(m, grad_accum)
    per_epoch = n // (batch_size * world_size * grad_accum)
    epoch, j = divmod(step, per_epoch)
    start = _offset(j, micro, batch_size, rank, world_size, grad_accum)
    return epoch_permutation(n, seed, epoch)[start : start + batch_size]


def _offset(j: int, micro: int, batch_size: int, rank: int, world_size: int, grad_accum: int) -> int:
    # Where this rank's micro-batch starts in an epoch's permutation: step j's block, then the micro-batch.
    return (j * grad_accum + micro) * batch_size * world_size + rank * batch_size


class StepBatchSampler(Sampler[list[int]]):
    """Yields this rank's index lists for global micro-batches ``start, start + 1, ...`` forever."""

    def __init__(
        self,
        n: int,
        start: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        grad_accum: int = 1,
    ) -> None:
        self.n, self.start, self.batch_size, self.seed = n, start, batch_size, seed
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum

    def __iter__(self) -> Iterator[list[int]]:
        per_epoch = self.n // (self.batch_size * self.world_size * self.grad_accum)  # steps
        step, micro = divmod(self.start, self.grad_accum)
        while True:
            epoch, j = divmod(step, per_epoch)
            perm = epoch_permutation(self.n, self.seed, epoch)
            for jj in range(j, per_epoch):
                for a in range(micro, self.grad_accum):
                    begin = _offset(jj, a, self.batch_size, self.rank, self.world_size, self.grad_accum)
                    yield perm[begin : begin + self.batch_size].tolist()
                micro = 0
            step = (epoch + 1) * per_epoch


class BatchSource:
    """Hands out micro-batches on ``device`` in order from global micro-batch ``start``.

    ``data`` is a tensor (rows are samples), a map-style ``Dataset`` (default collate), or a
    callable ``data(step, generator) -> batch`` given a CPU generator seeded from
    (seed, step, micro-batch, rank).
    """

    def __init__(
        self,
        data: torch.Tensor | Dataset | DataFn,
        *,
        batch_size: int,
        grad_accum: int,
        seed: int,
        device: torch.device,
        start_step: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        self.batch_size, self.grad_accum, self.seed, self.device = batch_size, grad_accum, seed, device
        self.rank, self.world_size = rank, world_size
        self.fn: DataFn | None = None
        self.tensor: torch.Tensor | None = None
        self.loader: Iterator[Any] | None = None
        start = start_step * grad_accum
        if isinstance(data, torch.Tensor):
            self._check_size(data.shape[0] if data.dim() else 0)
            # Small data sets live on the device whole: one transfer instead of one per batch.
            self.tensor = data.to(device) if data.numel() * data.element_size() < 2**30 else data
            self.m = start
        elif isinstance(data, IterableDataset):
            raise ConfigError(
                "data: expected a map-style Dataset (the batch position must be a function of the step), "
                f"got the IterableDataset {type(data).__name__}; wrap it as a callable data(step, generator)"
            )
        elif isinstance(data, Dataset) and hasattr(data, "__len__"):
            n = len(data)  # type: ignore[arg-type]
            self._check_size(n)
            sampler = StepBatchSampler(n, start, batch_size, seed, rank, world_size, grad_accum)
            pin = device.type == "cuda"
            loader = DataLoader(
                data, batch_sampler=sampler, num_workers=num_workers, collate_fn=default_collate, pin_memory=pin
            )
            self.loader = iter(loader)
        elif callable(data):
            self.fn = data
        else:
            raise ConfigError(
                "data: expected a Tensor, a map-style torch Dataset, or a callable data(step, generator), "
                f"got {type(data).__name__}"
            )

    def _check_size(self, n: int) -> None:
        need = self.batch_size * self.world_size * self.grad_accum
        if n < need:
            raise DataError(
                f"data: expected at least batch_size x world_size x grad_accum = {need} samples for one step, got {n}"
            )

    def close(self) -> None:
        """Stop the DataLoader's worker processes, if any."""
        self.loader = None

    def get(self, step: int, micro: int) -> Any:
        """The micro-batch ``micro`` of optimizer step ``step`` (asked for in order)."""
        if self.fn is not None:
            g = make_generator(derive_seed(self.seed, STREAM_DATA, step, micro, self.rank))
            batch = self.fn(step, g)
        elif self.tensor is not None:
            m = step * self.grad_accum + micro
            n = self.tensor.shape[0]
            idx = micro_batch_indices(n, m, self.batch_size, self.seed, self.rank, self.world_size, self.grad_accum)
            batch = self.tensor[idx.to(self.tensor.device)]
        else:
            assert self.loader is not None
            batch = next(self.loader)
        return to_device(batch, self.device, non_blocking=True)


def count_samples_tokens(batch: Any) -> tuple[int, int]:
    """(samples, tokens) in a batch: the leading size of its first tensor; tokens when that
    tensor holds integer ids of shape ``(B, T, ...)`` (else 0)."""
    t = first_tensor(batch)
    if t is None or t.dim() == 0:
        return 0, 0
    tokens = t.numel() if (t.dim() >= 2 and not t.is_floating_point() and not t.is_complex()) else 0
    return int(t.shape[0]), int(tokens)
