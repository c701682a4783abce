"""Run under `torchrun --nproc_per_node 2 ddp_worker.py OUT_DIR`: each rank trains the toy model
with gloo DDP and saves the weights it ends with to OUT_DIR/rank<r>.safetensors."""

import os
import sys

import torch
from safetensors.torch import save_file
from train_toys import mse_loss, toy_data, toy_model

from notelab.train import TrainConfig, fit


def ddp_config(out_dir: str | None, batch_size: int) -> TrainConfig:
    return TrainConfig(
        steps=5,
        batch_size=batch_size,
        grad_accum=2,
        lr=1e-2,
        weight_decay=0.1,
        out_dir=out_dir,
        progress=False,
        log_every=1,
    )


def main() -> None:
    torch.set_num_threads(1)
    out_dir = sys.argv[1]
    res = fit(toy_model(), mse_loss, toy_data(64), ddp_config(os.path.join(out_dir, "run"), batch_size=4))
    rank = os.environ["RANK"]
    save_file(
        {k: v.contiguous() for k, v in res.model.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.safetensors")
    )


if __name__ == "__main__":
    main()
