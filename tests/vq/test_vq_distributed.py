"""Under torch.distributed the codebook statistics are all-reduced: two ranks with half a batch each
end with the codebook one process gets from the whole batch."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from notelab.vq import VectorQuantizer


def _quantizer() -> VectorQuantizer:
    torch.manual_seed(0)
    return VectorQuantizer(6, 3, ema=True, decay=0.8)


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(40, 3, generator=g) for _ in range(3)]


def _worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        vq = _quantizer().train()
        for x in _batches():
            vq(x[rank * 20 : (rank + 1) * 20])  # each rank sees its half
        torch.save({"codebook": vq.codebook.clone(), "counts": vq.ema_counts.clone()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_process_on_the_whole_batch(tmp_path):
    out = str(tmp_path / "state")
    # fork: no second import of torch (spawn costs ~10 s on a loaded 2-core machine); the workers
    # run one thread, and a hang fails the test after 60 s instead of stalling the suite.
    ctx = mp.start_processes(_worker, args=(str(tmp_path / "init"), out), nprocs=2, join=False, start_method="fork")
    for p in ctx.processes:
        p.join(60)
    alive = [p for p in ctx.processes if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive and all(p.exitcode == 0 for p in ctx.processes)
    vq = _quantizer().train()
    for x in _batches():
        vq(x)
    for rank in range(2):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        torch.testing.assert_close(got["codebook"], vq.codebook)
        torch.testing.assert_close(got["counts"], vq.ema_counts)
