import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from ddp_worker import ddp_config
from safetensors.torch import load_file
from train_toys import mse_loss, toy_data, toy_model

from notelab.train import fit

HERE = Path(__file__).parent


def test_ddp_gloo_two_processes_match_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(HERE / "ddp_worker.py"),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, cwd=HERE, capture_output=True, timeout=240)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    rank0, rank1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # DDP keeps the replicas identical

    # One process over the same global batch (2 ranks x 4 = 8 per micro-batch) takes the same steps.
    single = fit(toy_model(), mse_loss, toy_data(64), ddp_config(None, batch_size=8))
    state = single.model.state_dict()
    assert not dist.is_initialized()
    for key in rank0:
        torch.testing.assert_close(rank0[key], state[key], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(state["0.weight"], toy_model().state_dict()["0.weight"])

    # Only rank 0 wrote, once: one checkpoint, one log line per step.
    trainer_state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert trainer_state["step"] == 5 and trainer_state["world_size"] == 2
    lines = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5]
    losses = [json.loads(line)["loss"] for line in lines]
    ref = [r["loss"] for r in single.history]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=1e-5, atol=1e-6)
