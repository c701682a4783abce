"""How ``fit`` spreads one training run over the processes ``torchrun`` starts: DDP or FSDP2.

Both are data parallel: rank ``r`` of ``N`` computes the gradient of its share of the global
batch, and the ranks together take the step one process would take on the whole batch
(``notelab.train.batches``). They differ in what each rank keeps (P parameters, AdamW, fp32
master weights; Rajbhandari et al. 2020, "ZeRO", sec. 3)::

    DDP  (replicas):           M_rank = 16 P                     4 B weights + 4 B grads + 8 B (m, v)
    FSDP (fully sharded):      M_rank = 16 P / N + G             each rank owns 1/N of every tensor;
                                                                 G = the bf16 weights of the unit being
                                                                 computed (all-gathered, then freed)

FSDP2 (``torch.distributed.fsdp.fully_shard``; Zhao et al. 2023, "PyTorch FSDP") shards every
parameter along dim 0 as a DTensor. Each *unit* (here every element of the model's outermost
``nn.ModuleList``s: Llama's decoder blocks, the seq Transformer's encoder and decoder layers, the
UNet's residual blocks) is all-gathered just before its forward and backward and freed after;
gradients are reduce-scattered in float32 (``MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=float32)`` when the run computes in bf16). What is left outside the units (embeddings,
head, final norm) forms the root unit.

``parallel="auto"`` picks FSDP when the training state (``training_state_bytes``) would take more
than ``AUTO_FSDP_FRACTION`` of one GPU's memory, else DDP; ``"ddp"`` / ``"fsdp"`` force one.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator

import torch
from torch import nn

from notelab.core.errors import ConfigError

PARALLEL = ("auto", "ddp", "fsdp")
# auto: FSDP once weights + grads + AdamW states pass this share of one device (activations need the rest).
AUTO_FSDP_FRACTION = 0.5
# Bytes per parameter of fit's training state: fp32 weight, fp32 grad, AdamW's fp32 m and v.
STATE_BYTES_PER_PARAM = 4 + 4 + 8


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (which always sets ``WORLD_SIZE`` and ``RANK``)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def check_launch(setting: str) -> None:
    """``parallel="fsdp"`` needs the process group ``torchrun`` sets up: one line when it is missing."""
    if setting == "fsdp" and not launched_by_torchrun():
        raise ConfigError(
            "parallel 'fsdp': expected a run started by torchrun (WORLD_SIZE and RANK set), got a plain process; "
            "launch it as `torchrun --nproc-per-node N ...`, or use parallel 'ddp' / 'auto'"
        )


def training_state_bytes(n_params: int, bytes_per_param: int = STATE_BYTES_PER_PARAM) -> int:
    """Bytes of weights + grads + AdamW states of ``n_params`` trainable fp32 parameters (16 P)."""
    return n_params * bytes_per_param


def choose_strategy(setting: str, world_size: int, state_bytes: int, device_bytes: int | None) -> str:
    """``"single"``, ``"ddp"`` or ``"fsdp"`` for ``TrainConfig.parallel = setting``.

    ``fsdp`` is kept at any world size (even 1, e.g. for CPU offload); ``ddp`` and ``auto`` with one
    process mean no wrapper. ``auto`` shards when ``state_bytes > AUTO_FSDP_FRACTION * device_bytes``
    (``device_bytes`` None: no device to fill, e.g. the CPU, so DDP).
    """
    if setting not in PARALLEL:
        raise ConfigError(f"parallel: expected one of {', '.join(PARALLEL)}, got {setting!r}")
    if setting == "fsdp":
        return "fsdp"
    if world_size <= 1:
        return "single"
    if setting == "auto" and device_bytes is not None and state_bytes > AUTO_FSDP_FRACTION * device_bytes:
        return "fsdp"
    return "ddp"


def device_memory(device: torch.device) -> int | None:
    """Total memory of a CUDA device in bytes; None elsewhere."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP wraps one by one: the elements of the model's outermost ``nn.ModuleList``s.

    An element that is itself a container (``ModuleList`` / ``ModuleDict``, never called) is
    searched in turn; elements without parameters are skipped. Submodules of a unit are not units.
    """
    units: list[nn.Module] = []

    def visit(module: nn.Module, in_list: bool) -> None:
        for child in module.children():
            if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                visit(child, True)
            elif in_list:
                if any(True for _ in child.parameters()):
                    units.append(child)
            else:
                visit(child, False)

    visit(model, False)
    return units


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are on the meta device (no memory).

    ``fully_shard`` changes a module in place; this copy, filled by :func:`gather_full`, is the
    plain model ``fit`` returns. Tied parameters stay tied (the copy maps each tensor once).
    """
    memo: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def shard(
    model: nn.Module, device: torch.device, param_dtype: torch.dtype | None, cpu_offload: bool = False
) -> nn.Module:
    """``fully_shard`` every unit (:func:`shard_units`), then the root; returns ``model`` (changed in place).

    A model on the meta device is materialised shard by shard on ``device`` and initialised by every
    submodule's ``reset_parameters()``, then the model's ``init_weights()`` (``notelab.lm.Llama`` has
    one), so a model larger than one device can be built.
    ``cpu_offload`` keeps the sharded fp32 weights, grads and AdamW states in CPU memory (the
    optimizer steps there); ``param_dtype`` is the dtype the units compute in (None: as stored).
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    params = list(model.parameters())
    if not params or not any(p.requires_grad for p in params):
        raise ConfigError(f"parallel 'fsdp': expected a model with trainable parameters, got {type(model).__name__}")
    if any(not p.is_floating_point() for p in params):
        raise ConfigError("parallel 'fsdp': expected floating-point parameters only (FSDP shards and reduces them)")
    if cpu_offload and device.type != "cuda":
        raise ConfigError(f"cpu_offload: expected a CUDA device (shards move from it to CPU memory), got {device}")
    on_meta = params[0].is_meta
    if on_meta and not callable(getattr(model, "init_weights", None)):
        raise ConfigError(
            "parallel 'fsdp': a model on the meta device needs an init_weights() method, "
            f"{type(model).__name__} has none"
        )
    if not on_meta:
        model.to(device)
    kwargs: dict = {}
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if cpu_offload:
        if dist.is_initialized() and "cpu:" not in dist.get_backend_config():
            raise ConfigError(
                "cpu_offload: the process group needs a CPU backend for the offloaded gradients' norm, got "
                f"{dist.get_backend_config()!r}: init_process_group('cpu:gloo,cuda:nccl'), or let fit join the group"
            )
        kwargs["offload_policy"] = CPUOffloadPolicy()
    try:
        for unit in shard_units(model):
            fully_shard(unit, **kwargs)
        fully_shard(model, **kwargs)
    except (ValueError, RuntimeError, AssertionError, TypeError, NotImplementedError) as e:
        what = " ".join(str(e).split())[:300]
        raise ConfigError(f"parallel 'fsdp': cannot shard {type(model).__name__}: {what}") from e
    if on_meta:
        materialise(model, torch.device("cpu") if cpu_offload else device)
        with torch.no_grad():
            for module in model.modules():  # torch's convention for a module's own initial values (norms: 1)
                if callable(getattr(module, "reset_parameters", None)):
                    module.reset_parameters()
            model.init_weights()
    return model


def materialise(model: nn.Module, device: torch.device) -> nn.Module:
    """``model.to_empty(device)`` with tied parameters tied again (``to_empty`` gives each name its own tensor)."""
    first: dict[int, str] = {}
    ties: list[tuple[str, str]] = []  # (name, the name it shares its parameter with)
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            ties.append((name, first[id(p)]))
        else:
            first[id(p)] = name
    model.to_empty(device=device)
    for name, source in ties:
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(source))
    return model


@contextlib.contextmanager
def no_grad_sync(model: nn.Module) -> Iterator[None]:
    """Accumulate gradients locally (no reduce-scatter) inside; FSDP's counterpart of ``DDP.no_sync``."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_tensor(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The whole tensor on ``device``: all-gathered if ``t`` is a DTensor (every rank must call it)."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        if t.device.type != device.type:  # CPU-offloaded shards travel over the device's backend
            t = DTensor.from_local(
                t.to_local().to(device), t.device_mesh, t.placements, shape=t.shape, stride=t.stride()
            )
        return t.full_tensor()
    return t.to(device)


def gather_full(skeleton: nn.Module, sharded: nn.Module, device: torch.device) -> nn.Module:
    """``skeleton`` (:func:`meta_skeleton`) filled with the whole weights of ``sharded``, on ``device``.

    Collective: every rank gets the same plain model, so what a family does after ``fit``
    (``save_pretrained``, sampling) runs unchanged under FSDP.
    """
    plain = materialise(skeleton, device)
    targets = plain.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, t in sharded.state_dict().items():  # one whole tensor at a time: memory for the copy only
            targets[name].copy_(full_tensor(t, device))
        for name, b in sharded.named_buffers():  # non-persistent buffers too (not in the state dict)
            plain.get_buffer(name).copy_(b)
    return plain
