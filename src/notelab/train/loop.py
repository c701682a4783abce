"""``fit``: the one training loop every family uses.

One optimizer step ``s`` (0-based) over ``A = grad_accum`` micro-batches ``b_1..b_A``::

    g     = (1/A) sum_a  grad L(theta; b_a)            gradient of the mean loss (averaged over ranks by DDP)
    g     = g * min(1, c / ||g||)                       global-norm clipping (Pascanu et al. 2013), c = grad_clip
    theta = AdamW(theta, g, lr(s))                      Adam (Kingma & Ba 2015, Alg. 1) with decoupled weight
                                                        decay (Loshchilov & Hutter 2019, Alg. 2, line 12),
                                                        no decay on 1-D params (norms, biases)
    ema   = decay * ema + (1 - decay) * theta           Polyak averaging (notelab.core.EMA)

``lr(s)`` is ``notelab.train.schedule.lr_at`` (warmup + cosine) or ``lr * lr_fn(s)``.

Reproducibility without saved RNG state: the data order, the generator handed to ``loss_fn`` and
torch's global RNG (dropout) are all re-seeded from (seed, step, micro-batch, rank) at every
step, so a run resumed from a checkpoint at step ``k`` computes exactly what the uninterrupted
run computes from ``k`` on (bit-identical on CPU).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from notelab.core.ema import EMA
from notelab.core.errors import CheckpointError, ConfigError, ShapeError, TrainingDivergedError
from notelab.core.runtime import autocast, autocast_dtype
from notelab.train import dcp, distributed, parallel
from notelab.train.batches import (
    STREAM_GLOBAL,
    STREAM_LOSS,
    BatchSource,
    DataFn,
    count_samples_tokens,
    derive_seed,
    make_generator,
    seed_global_rng,
)
from notelab.train.config import TrainConfig, compile_enabled
from notelab.train.logs import RunLogger, logger
from notelab.train.schedule import lr_multiplier
from notelab.train.state import LoadedCheckpoint, checkpoint_dir, find_checkpoint, load_checkpoint, save_checkpoint

LossOutput = torch.Tensor | tuple[torch.Tensor, dict[str, float]]
LossFn = Callable[[nn.Module, Any, torch.Generator], LossOutput]
Callback = Callable[[int, dict[str, Any]], None]


@dataclass
class FitResult:
    model: nn.Module  # the trained model, unwrapped (no DDP / compile), in eval mode
    ema_model: nn.Module | None  # the EMA weights, when config.ema_decay is set
    history: list[dict[str, Any]] = field(default_factory=list)  # the logged records (log.jsonl)
    step: int = 0  # optimizer steps done in total (including those before a resume)
    seconds: float = 0.0  # wall time of this call
    out_dir: Path | None = None


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices and embeddings (ndim >= 2), never norms or biases (ndim < 2)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("model: expected at least one parameter with requires_grad=True, got none")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module, config: TrainConfig, device: torch.device, fused_ok: bool = True
) -> torch.optim.AdamW:
    """AdamW over ``param_groups``; the fused CUDA kernel when on GPU and ``fused_ok``.

    Under FSDP ``fit`` passes ``fused_ok=False`` (foreach AdamW), the configuration measured on
    CUDA: on 2 H200s the 8B shape then peaked at 80.4 GB per GPU over its 64.2 GB of state, about
    the size of foreach's temporaries (16 GB). Fused AdamW on DTensor shards runs on the CPU
    (torch 2.13) but has not been measured on a GPU yet.
    """
    fused = fused_ok and device.type == "cuda" and all(p.is_floating_point() for p in model.parameters())
    return torch.optim.AdamW(
        param_groups(model, config.weight_decay), lr=config.lr, betas=config.betas, eps=config.eps, fused=fused or None
    )


def _apply_config_hparams(optimizer: torch.optim.Optimizer, config: TrainConfig) -> None:
    """The config, not a restored checkpoint, decides the hyper-parameters of fit's own AdamW."""
    for group in optimizer.param_groups:
        group["initial_lr"] = config.lr
        group["betas"] = config.betas
        group["eps"] = config.eps
        if group["weight_decay"] != 0.0:
            group["weight_decay"] = config.weight_decay


def split_loss(out: LossOutput) -> tuple[torch.Tensor, dict[str, float]]:
    """``loss_fn``'s output as (scalar loss, metrics)."""
    loss, metrics = (out[0], dict(out[1])) if isinstance(out, tuple) else (out, {})
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ShapeError(f"loss_fn: expected a scalar tensor (or (scalar, metrics)), got {shape}")
    return loss, metrics


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> bool:
    """Switch ``model.activation_checkpointing`` and return its previous value.

    The model decides what to recompute (``notelab.lm.Llama``: each decoder block, through
    ``torch.utils.checkpoint``); a model without that attribute cannot be asked to.
    """
    if not hasattr(model, "activation_checkpointing"):
        raise ConfigError(
            "TrainConfig.activation_checkpointing: expected a model with an `activation_checkpointing` attribute "
            f"(e.g. notelab.lm.Llama), got {type(model).__name__}"
        )
    previous = bool(model.activation_checkpointing)
    model.activation_checkpointing = enabled
    return previous


def _callbacks(callbacks: Iterable[Callback] | Callback) -> tuple[Callback, ...]:
    return (callbacks,) if callable(callbacks) else tuple(callbacks)


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    data: torch.Tensor | Dataset | DataFn,
    config: TrainConfig | None = None,
    *,
    lr_fn: Callable[[int], float] | None = None,
    callbacks: Sequence[Callback] | Callback = (),
    optimizer: torch.optim.Optimizer | None = None,
) -> FitResult:
    """Train ``model`` for ``config.steps`` optimizer steps of ``loss_fn`` on ``data``.

    ``loss_fn(model, batch, generator)`` returns a scalar loss, or ``(loss, metrics)`` with extra
    floats to log; ``generator`` lives on the training device and is seeded from (seed, step,
    micro-batch, rank): draw all the loss's randomness from it. ``model`` may be wrapped (DDP,
    compile): call it, and reach attributes through ``notelab.train.unwrap_model(model)``.

    ``data`` is a tensor (rows are samples), a map-style ``Dataset``, or ``data(step, generator)
    -> batch`` with a CPU generator seeded from (seed, step, micro-batch, rank).

    ``lr_fn(step) -> multiplier`` replaces the schedule (``lr = config.lr * lr_fn(step)``, step
    0-based). ``callbacks``: ``cb(step, logs)`` after each optimizer step on rank 0, ``step``
    counting steps done (1-based) and ``logs`` that step's loss, lr, grad_norm and metrics; the
    model is put back in train mode after them (under DDP a callback that raises stops rank 0
    only; the other ranks then wait until the process group times out). ``optimizer`` replaces fit's AdamW (its groups'
    ``lr`` is taken as the peak and scaled by the schedule).

    Fast by default on CUDA: the model is ``torch.compile``d (``config.compile="auto"``; ``False``
    opts out), runs under bf16 autocast (``precision="auto"``) and is stepped by the fused AdamW
    kernel; on the CPU it stays eager in float32. ``config.activation_checkpointing`` asks a model
    that supports it (``notelab.lm.Llama``) to recompute its blocks' activations in backward.

    Under ``torchrun`` (``notelab.train.parallel``): ``config.parallel="ddp"`` keeps a replica per
    rank, ``"fsdp"`` shards weights, grads and AdamW states over the ranks (FSDP2, per block; a
    model on the meta device is materialised shard by shard), ``"auto"`` shards when the training
    state would fill half a GPU. Under FSDP checkpoints are sharded (``notelab.train.dcp``,
    resumable at any world size, FSDP or not), callbacks run on every rank, and the returned model
    is a plain module holding the whole weights on every rank.

    ``resume=True`` continues from ``out_dir/checkpoint``; when there is none yet (killed before
    the first checkpoint) training starts from step 0 with a warning on the ``notelab.train``
    logger. A non-finite loss or gradient norm raises :class:`TrainingDivergedError` before the
    weights are touched, naming the last good checkpoint, which is left as it is.
    """
    config = config if config is not None else TrainConfig()
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"config: expected a TrainConfig, got {type(config).__name__}")
    parallel.check_launch(config.parallel)
    checkpointing_was = set_activation_checkpointing(model, True) if config.activation_checkpointing else None
    info, device = distributed.setup(config.device, group_of_one=config.parallel == "fsdp")
    result = None
    try:
        result = _fit(model, loss_fn, data, config, info, device, lr_fn, _callbacks(callbacks), optimizer)
        return result
    finally:
        distributed.teardown(info)
        if checkpointing_was is not None:
            model.activation_checkpointing = checkpointing_was
            if result is not None:  # under FSDP the result is a new module (parallel.gather_full)
                result.model.activation_checkpointing = checkpointing_was


def _fit(
    model: nn.Module,
    loss_fn: LossFn,
    data: torch.Tensor | Dataset | DataFn,
    config: TrainConfig,
    info: distributed.DistInfo,
    device: torch.device,
    lr_fn: Callable[[int], float] | None,
    callbacks: tuple[Callback, ...],
    optimizer: torch.optim.Optimizer | None,
) -> FitResult:
    t_start = time.perf_counter()
    amp_dtype = autocast_dtype(device, config.precision)
    state_bytes = parallel.training_state_bytes(parallel.trainable_parameters(model))
    strategy = parallel.choose_strategy(config.parallel, info.world_size, state_bytes, parallel.device_memory(device))
    fsdp = strategy == "fsdp"
    skeleton = None
    if fsdp:
        _check_fsdp_options(config, optimizer)
        skeleton = parallel.meta_skeleton(model)
        raw = parallel.shard(model, device, amp_dtype, config.cpu_offload)
    else:
        if any(p.is_meta for p in model.parameters()):
            raise ConfigError(
                f"model: a model on the meta device is materialised by FSDP only; expected parallel 'fsdp' "
                f"under torchrun, got {config.parallel!r} in a {info.world_size}-process run"
            )
        raw = model.to(device)
    own_optimizer = optimizer is None
    opt = build_optimizer(raw, config, device, fused_ok=not fsdp) if optimizer is None else optimizer
    for group in opt.param_groups:
        group.setdefault("initial_lr", group["lr"])
    ema = EMA(raw, config.ema_decay) if config.ema_decay is not None else None
    out_dir = Path(config.out_dir) if config.out_dir is not None else None

    start_step, prior_seconds = 0, 0.0
    last_good: tuple[Path, int] | None = None
    if config.resume:
        assert out_dir is not None  # TrainConfig checks it
        found = find_checkpoint(out_dir)
        if found is None:
            if info.is_main:
                logger.warning("resume: no checkpoint in %s yet; training from step 0", out_dir)
        else:
            loaded = _load(found, raw, opt, ema, fsdp)
            start_step, prior_seconds = loaded.step, float(loaded.state.get("seconds", 0.0))
            last_good = (found, loaded.step)
    if own_optimizer:
        _apply_config_hparams(opt, config)

    run_log = RunLogger(out_dir if info.is_main else None, keep_until=start_step if last_good else None)
    wrapped = raw if fsdp else distributed.wrap(raw, info, device)
    ddp = wrapped if strategy == "ddp" else None
    if compile_enabled(config.compile, device):
        wrapped = torch.compile(wrapped)
    source = BatchSource(
        data,
        batch_size=config.batch_size,
        grad_accum=config.grad_accum,
        seed=config.seed,
        device=device,
        start_step=start_step,
        rank=info.rank,
        world_size=info.world_size,
        num_workers=config.num_workers,
    )
    clip_params = [p for g in opt.param_groups for p in g["params"]]
    max_norm = config.grad_clip if config.grad_clip is not None else math.inf
    bar = tqdm(
        total=config.steps,
        initial=start_step,
        disable=not (config.progress and info.is_main),
        desc="train",
        dynamic_ncols=True,
    )
    interval: dict[str, float] = {}
    t_interval = time.perf_counter()
    step = start_step
    wrapped.train()
    try:
        for step in range(start_step, config.steps):
            multiplier = lr_fn(step) if lr_fn is not None else lr_multiplier(step, config)
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * multiplier
            lr = opt.param_groups[0]["lr"]
            seed_global_rng(derive_seed(config.seed, STREAM_GLOBAL, step, info.rank), device)

            loss_sum = torch.zeros((), device=device)
            metrics: dict[str, float] = {}
            samples = tokens = 0
            for micro in range(config.grad_accum):
                batch = source.get(step, micro)
                gen = make_generator(derive_seed(config.seed, STREAM_LOSS, step, micro, info.rank), device)
                # Gradients are averaged over ranks once per optimizer step, on the last micro-batch.
                last = micro == config.grad_accum - 1
                sync = contextlib.nullcontext()
                if not last and ddp is not None:
                    sync = ddp.no_sync()
                elif not last and fsdp:
                    sync = parallel.no_grad_sync(raw)
                with sync:
                    with autocast(device, amp_dtype):
                        loss, extra = split_loss(loss_fn(wrapped, batch, gen))
                    (loss / config.grad_accum).backward()
                loss_sum += loss.detach().float()
                for key, value in extra.items():
                    metrics[key] = metrics.get(key, 0.0) + float(value) / config.grad_accum
                s, t = count_samples_tokens(batch)
                samples, tokens = samples + s, tokens + t
            if "tokens" in metrics:  # the loss knows best what a token is (e.g. non-padding targets)
                tokens = round(metrics.pop("tokens") * config.grad_accum)

            loss_mean = distributed.mean_over_ranks(loss_sum / config.grad_accum, info)
            grad_norm = torch.nn.utils.clip_grad_norm_(clip_params, max_norm)
            if fsdp:  # a DTensor (the norm over every rank's shards), possibly on the CPU (offload)
                grad_norm = parallel.full_tensor(grad_norm, device)
            # One host sync per step, for the guard and the logs together.
            loss_value, norm_value = torch.stack([loss_mean, grad_norm.float()]).tolist()
            if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                raise TrainingDivergedError(_diverged_message(step + 1, loss_value, norm_value, last_good, out_dir))
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(raw)
            done = step + 1

            step_logs = {"step": done, "loss": loss_value, "lr": lr, "grad_norm": norm_value}
            step_logs.update({k: v for k, v in metrics.items() if k not in step_logs})
            _accumulate(interval, step_logs, samples, tokens)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4g}", lr=f"{lr:.3g}", refresh=False)
            if done % config.log_every == 0 or done == config.steps:
                now = time.perf_counter()
                record = _record(interval, done, lr, now - t_interval, info.world_size)
                record["seconds"] = round(prior_seconds + now - t_start, 3)
                if device.type == "cuda":  # this process's peak so far (the caching allocator's count, no sync)
                    record["max_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 3)
                run_log.log(record)
                interval, t_interval = {}, now

            if out_dir is not None and ((config.ckpt_every and done % config.ckpt_every == 0) or done == config.steps):
                path = checkpoint_dir(out_dir)
                extra_state = {"world_size": info.world_size, "seconds": prior_seconds + time.perf_counter() - t_start}
                if fsdp:  # every rank writes its shards
                    dcp.save_sharded(path, step=done, config=config, model=raw, optimizer=opt, extra=extra_state)
                elif info.is_main:
                    save_checkpoint(
                        path,
                        step=done,
                        config=config,
                        model=raw,
                        optimizer=opt,
                        ema_model=ema.model if ema else None,
                        extra=extra_state,
                    )
                last_good = (path, done)
            # Under FSDP a callback that calls the model needs every rank (the weights are sharded).
            if callbacks and (info.is_main or fsdp):
                for cb in callbacks:
                    cb(done, dict(step_logs))
                wrapped.train()
            step = done
        distributed.barrier(info)
    finally:
        bar.close()
        run_log.close()
        source.close()
    if skeleton is not None:
        raw = parallel.gather_full(skeleton, raw, device)
    raw.eval()
    return FitResult(
        model=raw,
        ema_model=ema.model if ema else None,
        history=run_log.history,
        step=step,
        seconds=time.perf_counter() - t_start,
        out_dir=out_dir,
    )


def _check_fsdp_options(config: TrainConfig, optimizer: torch.optim.Optimizer | None) -> None:
    """What FSDP cannot take from the caller: an optimizer built before sharding, an EMA copy."""
    if optimizer is not None:
        raise ConfigError(
            "optimizer: parallel 'fsdp' replaces the model's parameters by shards, so fit builds AdamW itself; "
            "got an optimizer built before (pass optimizer=None, or use parallel 'ddp')"
        )
    if config.ema_decay is not None:
        raise ConfigError(
            "TrainConfig.ema_decay: an EMA copy is not sharded; "
            f"expected None with parallel 'fsdp', got {config.ema_decay}"
        )


def _load(found: Path, raw: nn.Module, opt: torch.optim.Optimizer, ema: EMA | None, fsdp: bool) -> LoadedCheckpoint:
    """Resume from either checkpoint format: sharded (DCP) at any world size, replicated (safetensors) without FSDP."""
    if dcp.is_sharded(found):
        if ema is not None:
            raise ConfigError(f"TrainConfig.ema_decay: the sharded checkpoint {found} holds no EMA; expected None")
        return dcp.load_sharded(found, model=raw, optimizer=opt)
    if fsdp:
        raise CheckpointError(
            f"{found}: a replicated (DDP / one-process) checkpoint cannot be resumed under parallel 'fsdp'; "
            "resume it with parallel 'ddp' (at any world size)"
        )
    return load_checkpoint(found, model=raw, optimizer=opt, ema_model=ema.model if ema else None)


def _accumulate(interval: dict[str, float], step_logs: dict[str, Any], samples: int, tokens: int) -> None:
    interval["samples"] = interval.get("samples", 0) + samples
    interval["tokens"] = interval.get("tokens", 0) + tokens
    for key, value in step_logs.items():
        if key not in ("step", "lr"):
            interval["sum:" + key] = interval.get("sum:" + key, 0.0) + value
            interval["count:" + key] = interval.get("count:" + key, 0) + 1


def _record(interval: dict[str, float], step: int, lr: float, dt: float, world_size: int) -> dict[str, Any]:
    """One log line: means of loss, grad norm and metrics over the steps since the last line."""
    record: dict[str, Any] = {"step": step, "lr": lr}
    for key, value in interval.items():
        if key.startswith("sum:"):
            name = key[4:]
            record[name] = value / interval["count:" + name]  # a metric may come on some steps only
    dt = max(dt, 1e-9)
    record["samples_per_s"] = interval["samples"] * world_size / dt
    if interval["tokens"]:
        record["tokens_per_s"] = interval["tokens"] * world_size / dt
    return record


def _diverged_message(
    step: int, loss: float, grad_norm: float, last_good: tuple[Path, int] | None, out_dir: Path | None
) -> str:
    what = f"loss {loss}" if not math.isfinite(loss) else f"grad norm {grad_norm} (loss {loss})"
    if last_good is not None:
        where = f"last good checkpoint: {last_good[0]} (step {last_good[1]})"
    elif out_dir is not None:
        where = f"no checkpoint written yet in {out_dir}"
    else:
        where = "no checkpoint (out_dir is None)"
    return f"training diverged at step {step}: non-finite {what}; weights not updated; {where}"
