import pytest
import torch
from train_toys import noisy_loss, toy_data, toy_model

from notelab.train import TrainConfig, fit

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_fit_on_cuda_bf16_fused_adamw_and_resume(tmp_path):
    seen = {}

    def loss_fn(model, batch, g):
        seen["generator"] = g.device.type
        seen["batch"] = batch.device.type
        seen["autocast"] = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        return noisy_loss(model, batch, g)

    cfg = dict(steps=40, batch_size=16, lr=1e-2, ema_decay=0.9, ckpt_every=20, out_dir=str(tmp_path), progress=False)
    res = fit(toy_model(), loss_fn, toy_data(64), TrainConfig(**cfg, log_every=10))
    assert seen == {"generator": "cuda", "batch": "cuda", "autocast": torch.bfloat16}
    assert next(res.model.parameters()).device.type == "cuda"
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    peaks = [r["max_memory_gb"] for r in res.history]  # the allocator's peak so far, in every record on CUDA
    assert all(p > 0 for p in peaks) and peaks == sorted(peaks)
    more = fit(toy_model(seed=3), loss_fn, toy_data(64), TrainConfig(**{**cfg, "steps": 50}, resume=True))
    assert more.step == 50 and [r["step"] for r in more.history][-1] == 50
