"""FSDP2 and DDP over 2 gloo processes against one process, and a killed FSDP run resumed at world size 2 and 1.

Tolerances (float32 on the CPU): the 2-process runs reduce in another order than one process, so
weights agree to |a - b| <= 1e-5 + 1e-4 |b| and losses to 1e-5 relative (measured: 4e-6 at most on
the weights); a resume at the same world size is bit-identical; a resume at world size 1 of a run
sharded over 2 agrees to 1e-6 + 1e-5 |b| (measured: 1.2e-7).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from fsdp_worker import KILL_AT, match_config, run_config, tiny_llama, windows
from safetensors.torch import load_file

from notelab.lm.train import next_token_loss
from notelab.train import fit

HERE = Path(__file__).parent


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [*cmd, str(HERE / "fsdp_worker.py"), *args], env=env, cwd=HERE, capture_output=True, timeout=300
    )


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """One torchrun launch for the matching runs, the uninterrupted run and the killed one; a copy of the
    killed run's folder (for the world-size-1 resume) before a second launch resumes it at world size 2."""
    out = tmp_path_factory.mktemp("fsdp")
    killed = torchrun("all", str(out))
    log = killed.stderr.decode()[-3000:]
    assert killed.returncode != 0 and "SIGKILL" in log, log  # rank 1 killed itself, after the other runs
    shutil.copytree(out / "run", out / "run_ws1")
    resumed = torchrun("resume", str(out))
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    return out


def test_fsdp_and_ddp_on_two_processes_match_one_process(two_process_runs):
    out = two_process_runs
    single = fit(tiny_llama(), next_token_loss, windows(), match_config(batch_size=8))  # the global batch
    assert not dist.is_initialized()
    ref = single.model.state_dict()
    ref_losses = torch.tensor([r["loss"] for r in single.history])
    assert not torch.equal(ref["layers.0.mlp.up_proj.weight"], tiny_llama().state_dict()["layers.0.mlp.up_proj.weight"])
    for parallel in ("fsdp", "ddp"):
        ranks = [load_file(out / f"{parallel}.rank{r}.safetensors") for r in (0, 1)]
        assert ranks[0].keys() == ref.keys()  # fit returned the whole plain model, under FSDP too
        for key in ref:
            assert torch.equal(ranks[0][key], ranks[1][key]), (parallel, key)
            torch.testing.assert_close(ranks[0][key], ref[key], rtol=1e-4, atol=1e-5, msg=f"{parallel} {key}")
        losses = torch.tensor(json.loads((out / f"{parallel}.rank0.json").read_text()))
        torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)


def test_killed_fsdp_run_resumes_at_world_size_two_and_one(two_process_runs):
    out = two_process_runs
    state = json.loads((out / "run_ws1" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 3 < KILL_AT and state["world_size"] == 2 and state["format"] == "dcp-safetensors"
    shards = sorted(p.name for p in (out / "run_ws1" / "checkpoint").glob("*.safetensors"))
    assert len(shards) == 2  # one file of pieces per rank
    ref = load_file(out / "ref.rank0.safetensors")
    for r in (0, 1):  # the same world size: what the uninterrupted run computed, bit for bit
        resumed = load_file(out / f"resume.rank{r}.safetensors")
        assert all(torch.equal(resumed[k], ref[k]) for k in ref)
    # One plain process (no torchrun) resumes the sharded checkpoint on the global batch.
    config = run_config(str(out / "run_ws1"), batch_size=8, resume=True, parallel="auto")
    res = fit(tiny_llama(seed=7), next_token_loss, windows(), config)
    assert res.step == 8 and [r["step"] for r in res.history] == list(range(1, 9))
    for key, value in res.model.state_dict().items():
        torch.testing.assert_close(value, ref[key], rtol=1e-5, atol=1e-6, msg=key)
