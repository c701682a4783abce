"""One training loop for every family: ``fit(model, loss_fn, data, TrainConfig(...))``.

AdamW with decoupled weight decay, warmup + cosine, clipping, gradient accumulation, EMA, bf16
autocast on GPU, atomic checkpoints with exact resume, JSONL / TensorBoard logs, a NaN guard,
and DDP or FSDP2 when launched by ``torchrun`` (``TrainConfig.parallel``; sharded checkpoints in
``notelab.train.dcp``, resumable at any world size and exportable with ``export_pretrained``).
"""

from notelab.train.config import TrainConfig
from notelab.train.dcp import export_pretrained, load_sharded, save_sharded
from notelab.train.distributed import unwrap_model
from notelab.train.logs import plot_history, read_jsonl
from notelab.train.loop import FitResult, build_optimizer, fit, param_groups
from notelab.train.schedule import lr_at, lr_multiplier, warmup_constant, warmup_cosine
from notelab.train.state import find_checkpoint, load_checkpoint, save_checkpoint

__all__ = [
    "FitResult",
    "TrainConfig",
    "build_optimizer",
    "export_pretrained",
    "find_checkpoint",
    "fit",
    "load_checkpoint",
    "load_sharded",
    "lr_at",
    "lr_multiplier",
    "param_groups",
    "plot_history",
    "read_jsonl",
    "save_checkpoint",
    "save_sharded",
    "unwrap_model",
    "warmup_constant",
    "warmup_cosine",
]
