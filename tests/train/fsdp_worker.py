"""Worker of the FSDP tests, run as `torchrun --nproc_per_node N fsdp_worker.py MODE OUT_DIR`.

MODE all:    (1) train the tiny Llama with parallel "fsdp", then "ddp", from the same weights; rank r
             saves the final weights to OUT_DIR/{fsdp,ddp}.rank<r>.safetensors and the logged losses
             to OUT_DIR/{fsdp,ddp}.rank<r>.json; (2) the resumable FSDP run (a checkpoint every 3
             steps) uninterrupted in OUT_DIR/ref -> OUT_DIR/ref.rank<r>.safetensors; (3) the same run
             in OUT_DIR/run, where rank 1 SIGKILLs itself after step KILL_AT (torchrun then stops rank 0).
MODE resume: resume OUT_DIR/run under FSDP at this world size -> OUT_DIR/resume.rank<r>.safetensors.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from notelab.lm import Llama, LlamaConfig
from notelab.lm.train import next_token_loss
from notelab.train import TrainConfig, fit

SEQ = 8
KILL_AT = 5  # rank 1 of the interrupted run dies after this step; its last checkpoint is step 3


def tiny_llama(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=32)
    return Llama(config)


def windows(n: int = 64, seed: int = 1) -> torch.Tensor:
    """(n, SEQ + 1) token windows: a tensor, so that the ranks' shares make up one process's batch."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (n, SEQ + 1), generator=g)


def match_config(batch_size: int, parallel: str = "auto") -> TrainConfig:
    return TrainConfig(
        steps=4, batch_size=batch_size, grad_accum=2, lr=1e-2, weight_decay=0.1, progress=False, log_every=1,
        parallel=parallel,
    )  # fmt: skip


def run_config(out_dir: str, batch_size: int, resume: bool = False, parallel: str = "fsdp") -> TrainConfig:
    return TrainConfig(
        steps=8, batch_size=batch_size, grad_accum=2, lr=1e-2, warmup_steps=2, weight_decay=0.1, ckpt_every=3,
        log_every=1, out_dir=out_dir, resume=resume, progress=False, parallel=parallel,
    )  # fmt: skip


def save_state(model: torch.nn.Module, path: str) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, path)


def main() -> None:
    torch.set_num_threads(1)
    mode, out = sys.argv[1], sys.argv[2]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    batch = 8 // world
    # One process group for the worker's several fits (fit joins it and leaves it up): creating and
    # destroying one per fit in the same process is not reliable with gloo.
    dist.init_process_group("gloo")
    if mode == "all":
        for parallel in ("fsdp", "ddp"):
            res = fit(tiny_llama(), next_token_loss, windows(), match_config(batch, parallel))
            save_state(res.model, os.path.join(out, f"{parallel}.rank{rank}.safetensors"))
            with open(os.path.join(out, f"{parallel}.rank{rank}.json"), "w") as f:
                json.dump([r["loss"] for r in res.history], f)
        res = fit(tiny_llama(), next_token_loss, windows(), run_config(os.path.join(out, "ref"), batch))
        save_state(res.model, os.path.join(out, f"ref.rank{rank}.safetensors"))

    def kill(step: int, logs: dict) -> None:
        if step == KILL_AT and rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    # Resuming starts from other weights: every weight must come from the checkpoint.
    model = tiny_llama(seed=0 if mode == "all" else 7)
    config = run_config(os.path.join(out, "run"), batch, resume=mode == "resume")
    res = fit(model, next_token_loss, windows(), config, callbacks=[kill] if mode == "all" else [])
    save_state(res.model, os.path.join(out, f"{mode}.rank{rank}.safetensors"))


if __name__ == "__main__":
    main()
