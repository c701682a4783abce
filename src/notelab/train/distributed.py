"""DDP when started under ``torchrun``: the environment decides, not a flag.

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; with ``WORLD_SIZE > 1`` ``fit``
joins the process group (NCCL on CUDA, gloo on CPU), puts each process on ``cuda:LOCAL_RANK``,
wraps the model in ``DistributedDataParallel`` (gradients averaged over ranks, so the ranks
together take the step one process would take on the global batch) and lets only rank 0 write.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from notelab.core.runtime import get_device


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # fit initialised the process group, so fit tears it down

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_name: str, group_of_one: bool = False) -> tuple[DistInfo, torch.device]:
    """Join the process group if launched by ``torchrun`` with several processes; pick the device.

    ``group_of_one``: join it with a single process too (``torchrun --nproc-per-node 1``), which
    FSDP needs for its DTensors.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 and not (group_of_one and "RANK" in os.environ):
        return DistInfo(), get_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = get_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        # On CUDA, CPU tensors get gloo: FSDP's CPU offload keeps gradient shards there (their norm is reduced there)
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, owns_group=owns), device


def wrap(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)`` under DDP, else ``model``."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def mean_over_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of ``value`` over ranks (``value`` itself without DDP)."""
    if not info.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def teardown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside ``torch.compile`` and ``DistributedDataParallel`` wrappers (FSDP2 wraps none)."""
    from torch.nn.parallel import DistributedDataParallel

    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model
