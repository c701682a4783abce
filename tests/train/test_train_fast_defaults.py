"""fit's fast defaults: compile on CUDA only ("auto"), optional activation checkpointing equal to the plain path."""

import pytest
import torch
from torch import nn
from train_toys import mse_loss, toy_data, toy_model

from notelab.core.errors import ConfigError
from notelab.lm import Llama, LlamaConfig
from notelab.lm.data import PackedStream
from notelab.lm.train import next_token_loss
from notelab.train import TrainConfig, fit
from notelab.train.config import compile_enabled


def test_compile_auto_means_cuda_only():
    assert TrainConfig().compile == "auto"
    assert compile_enabled("auto", torch.device("cuda")) and compile_enabled("auto", torch.device("cuda", 3))
    assert not compile_enabled("auto", torch.device("cpu"))
    assert compile_enabled(True, torch.device("cpu")) and not compile_enabled(False, torch.device("cuda"))


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"compile": "yes"}, "TrainConfig.compile: expected 'auto', True or False, got 'yes'"),
        ({"compile": 1}, "TrainConfig.compile"),
        ({"activation_checkpointing": "on"}, "TrainConfig.activation_checkpointing: expected True or False"),
    ],
)
def test_bad_compile_and_checkpointing_settings_are_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**kw)


def test_default_fit_on_cpu_does_not_compile():
    seen = []

    def loss_fn(model, batch, g):
        seen.append(type(model).__name__)
        return mse_loss(model, batch, g)

    fit(toy_model(), loss_fn, toy_data(32), TrainConfig(steps=2, batch_size=8, progress=False, device="cpu"))
    assert seen == ["Sequential", "Sequential"]  # the user's module itself, not torch.compile's OptimizedModule


def tiny_llama(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(
        LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=16)
    )


def count_block_calls(model: Llama) -> list[int]:
    calls = [0]

    def hook(module, args, out):
        calls[0] += 1

    # on the attention inside each block: recomputation stops early, before the block's own hooks would run
    for layer in model.layers:
        layer.self_attn.register_forward_hook(hook)
    return calls


def test_llama_activation_checkpointing_gives_the_plain_gradients_and_recomputes_each_block():
    batch = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(0))
    out = {}
    for checkpointing in (False, True):
        model = tiny_llama()
        model.activation_checkpointing = checkpointing
        calls = count_block_calls(model)
        loss, _ = next_token_loss(model, batch)
        loss.backward()
        out[checkpointing] = (loss.detach(), {k: p.grad for k, p in model.named_parameters()}, calls[0])
    torch.testing.assert_close(out[True][0], out[False][0], atol=0, rtol=0)
    for name, grad in out[False][1].items():
        torch.testing.assert_close(out[True][1][name], grad, atol=1e-6, rtol=1e-6, msg=name)
    assert (out[False][2], out[True][2]) == (2, 4)  # each block once, or once more in backward
    # no recomputation without autograd (evaluation, decoding)
    model = tiny_llama()
    model.activation_checkpointing = True
    calls = count_block_calls(model)
    with torch.no_grad():
        model(batch)
    assert calls[0] == 2


def test_fit_with_activation_checkpointing_trains_the_same_weights_and_restores_the_flag():
    stream = PackedStream(torch.randint(0, 64, (500,), generator=torch.Generator().manual_seed(1)), 12, 4)
    config = dict(steps=3, batch_size=4, lr=1e-2, progress=False, device="cpu")
    plain = fit(tiny_llama(), next_token_loss, stream, TrainConfig(**config))
    model = tiny_llama()
    calls = count_block_calls(model)
    ckpt = fit(model, next_token_loss, stream, TrainConfig(**config, activation_checkpointing=True))
    assert calls[0] == 3 * 2 * 2  # steps x blocks x (forward + recompute)
    assert model.activation_checkpointing is False  # the model is handed back as it came
    for (name, a), b in zip(plain.model.named_parameters(), ckpt.model.parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6, msg=name)
    assert [r["loss"] for r in ckpt.history] == pytest.approx([r["loss"] for r in plain.history], abs=1e-6)


def test_activation_checkpointing_on_a_model_without_support_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="expected a model with an `activation_checkpointing` attribute.*Sequential"):
        fit(
            toy_model(),
            mse_loss,
            toy_data(32),
            TrainConfig(steps=1, batch_size=8, activation_checkpointing=True, out_dir=str(tmp_path / "run")),
        )
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_fit_builds_fused_adamw_on_cuda_only():
    from notelab.train import build_optimizer

    model = nn.Linear(3, 2)
    opt = build_optimizer(model, TrainConfig(), torch.device("cpu"))
    assert not opt.defaults.get("fused")
    if torch.cuda.is_available():
        opt = build_optimizer(model.cuda(), TrainConfig(), torch.device("cuda"))
        assert opt.defaults["fused"]
