"""The training configuration shared by every family (separate from any model's config)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from notelab.core.errors import ConfigError, unknown_name
from notelab.core.runtime import PRECISIONS
from notelab.train.parallel import PARALLEL

SCHEDULES = ("cosine", "constant")


def compile_enabled(setting: bool | str, device: torch.device) -> bool:
    """Whether ``fit`` compiles the model: ``"auto"`` compiles on CUDA only.

    On a GPU a compiled step pays for its compile time within a few hundred steps (fused
    element-wise kernels, fewer launches); on the CPU the compile time (tens of seconds) dominates
    the short runs and tests that happen there, so ``"auto"`` leaves the model eager.
    """
    if setting == "auto":
        return device.type == "cuda"
    return bool(setting)


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 64  # per process, per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-4  # peak learning rate
    weight_decay: float = 0.0  # decoupled (AdamW); never applied to 1-D params (norms, biases)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8  # Adam's epsilon (the Transformer paper used 1e-9)
    warmup_steps: int = 0  # linear warmup from 0
    min_lr_ratio: float = 0.0  # cosine decays from lr to lr * min_lr_ratio at `steps`
    schedule: str = "cosine"  # "cosine" | "constant"; `fit(lr_fn=...)` overrides both
    grad_clip: float | None = 1.0  # max global grad norm; None: no clipping
    ema_decay: float | None = None  # keep an EMA copy of the weights
    precision: str = "auto"  # bf16 autocast on GPU, fp32 on CPU (notelab.core.runtime)
    device: str = "auto"
    seed: int = 0  # seeds data order and every generator handed to the loss
    log_every: int = 50  # JSONL (+ TensorBoard if installed) every N steps
    ckpt_every: int = 0  # 0: only at the end
    out_dir: str | None = None  # None: nothing written
    resume: bool = False  # continue from out_dir/checkpoint
    progress: bool = True  # tqdm bar
    compile: bool | str = "auto"  # torch.compile the model: "auto" on CUDA only (compile_enabled); False opts out
    activation_checkpointing: bool = False  # recompute each block's activations in backward (model must support it)
    num_workers: int = 0  # DataLoader workers for a map-style Dataset
    parallel: str = "auto"  # under torchrun: "ddp" replicas, "fsdp" shards (FSDP2), "auto" by size (train.parallel)
    cpu_offload: bool = False  # fsdp only: sharded weights, grads and AdamW states live in CPU memory

    def __post_init__(self) -> None:
        positive = {"steps": self.steps, "batch_size": self.batch_size, "grad_accum": self.grad_accum}
        positive.update(log_every=self.log_every)
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"TrainConfig.{name}: expected an integer >= 1, got {value!r}")
        for name in ("warmup_steps", "ckpt_every", "num_workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"TrainConfig.{name}: expected an integer >= 0, got {value!r}")
        if not self.lr > 0:
            raise ConfigError(f"TrainConfig.lr: expected a positive number, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"TrainConfig.weight_decay: expected >= 0, got {self.weight_decay!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"TrainConfig.betas: expected two numbers in [0, 1), got {self.betas!r}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"TrainConfig.min_lr_ratio: expected a number in [0, 1], got {self.min_lr_ratio!r}")
        if self.schedule not in SCHEDULES:
            raise unknown_name("schedule", self.schedule, SCHEDULES)
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"TrainConfig.grad_clip: expected None or a positive number, got {self.grad_clip!r}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"TrainConfig.ema_decay: expected None or a number in [0, 1), got {self.ema_decay!r}")
        if self.precision not in PRECISIONS:
            raise unknown_name("precision", self.precision, PRECISIONS)
        if self.precision == "fp16":
            raise ConfigError("TrainConfig.precision: 'fp16' needs loss scaling, which fit does not do; use 'bf16'")
        if not (isinstance(self.compile, bool) or self.compile == "auto"):
            raise ConfigError(f"TrainConfig.compile: expected 'auto', True or False, got {self.compile!r}")
        if not isinstance(self.activation_checkpointing, bool):
            raise ConfigError(
                f"TrainConfig.activation_checkpointing: expected True or False, got {self.activation_checkpointing!r}"
            )
        if self.parallel not in PARALLEL:
            raise unknown_name("parallel", self.parallel, PARALLEL)
        if not isinstance(self.cpu_offload, bool):
            raise ConfigError(f"TrainConfig.cpu_offload: expected True or False, got {self.cpu_offload!r}")
        if self.cpu_offload and self.parallel != "fsdp":
            raise ConfigError(
                f"TrainConfig.cpu_offload: expected parallel 'fsdp' (it offloads shards), got {self.parallel!r}"
            )
        if self.resume and self.out_dir is None:
            raise ConfigError("TrainConfig.resume: expected out_dir to be set (where the checkpoint is), got None")
