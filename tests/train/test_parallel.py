"""notelab.train.parallel / dcp in one process: the strategy choice, the units, the errors, and FSDP on a
gloo process group of one (what `torchrun --nproc-per-node 1` gives): same steps as a plain fit, sharded
checkpoints that a plain process resumes and exports."""

import dataclasses
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
from fsdp_worker import tiny_llama, windows
from torch import nn

from notelab.core.denoisers import UNet, UNetConfig
from notelab.core.errors import CheckpointError, ConfigError
from notelab.core.limits import allow_large_models
from notelab.lm import Llama, LlamaConfig
from notelab.lm.flops import count_parameters
from notelab.lm.train import next_token_loss
from notelab.seq.transformer import Transformer, TransformerConfig
from notelab.train import TrainConfig, fit
from notelab.train import dcp as dcp_module
from notelab.train.dcp import export_pretrained, is_sharded
from notelab.train.parallel import (
    AUTO_FSDP_FRACTION,
    choose_strategy,
    meta_skeleton,
    shard_units,
    training_state_bytes,
)

TORCHRUN_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def config(**kw) -> TrainConfig:
    base = dict(steps=4, batch_size=4, grad_accum=2, lr=1e-2, weight_decay=0.1, progress=False, log_every=1)
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def plain_process(monkeypatch):
    for key in TORCHRUN_VARS:
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def group_of_one(monkeypatch):
    """The variables `torchrun --nproc-per-node 1` sets; fit then joins (and leaves) a gloo group of one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    yield
    assert not dist.is_initialized()  # fit tore down the group it made


def test_choose_strategy():
    gb = 10**9
    assert choose_strategy("fsdp", 1, 0, None) == "fsdp"  # forced, even alone (CPU offload on one GPU)
    assert choose_strategy("auto", 1, 10**15, gb) == "single" and choose_strategy("ddp", 1, 0, None) == "single"
    assert choose_strategy("ddp", 4, 10**15, gb) == "ddp"
    assert choose_strategy("auto", 2, int(AUTO_FSDP_FRACTION * 141 * gb), 141 * gb) == "ddp"
    assert choose_strategy("auto", 2, int(AUTO_FSDP_FRACTION * 141 * gb) + 1, 141 * gb) == "fsdp"
    assert choose_strategy("auto", 2, 10**15, None) == "ddp"  # no device memory to fill (CPU)
    with pytest.raises(ConfigError, match="parallel: expected one of auto, ddp, fsdp, got 'zero3'"):
        choose_strategy("zero3", 2, 0, None)


def test_training_state_of_the_8b_shape_is_more_than_half_an_h200():
    with allow_large_models(True):
        n = count_parameters(LlamaConfig.from_name("llama3.1-8b"))
    assert n == 8_030_261_248
    assert training_state_bytes(n) == 16 * n  # fp32 weight, grad, AdamW m and v
    assert choose_strategy("auto", 2, training_state_bytes(n), 141 * 10**9) == "fsdp"
    assert (
        choose_strategy(
            "auto", 2, training_state_bytes(count_parameters(LlamaConfig.from_name("llama3.2-1b"))), 141 * 10**9
        )
        == "ddp"
    )


def test_shard_units_are_the_blocks():
    llama = tiny_llama()
    assert shard_units(llama) == list(llama.layers)
    unet = UNet(
        UNetConfig(in_channels=1, image_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, groups=4)
    )
    units = shard_units(unet)
    assert units and all(any(True for _ in u.parameters()) for u in units)
    assert not any(isinstance(u, nn.Upsample) for u in units)  # no parameters, nothing to shard
    assert len(units) == len(list(unet.down)) + sum(1 for m in unet.up if not isinstance(m, nn.Upsample))
    seq = Transformer(TransformerConfig.from_name("tiny"))
    assert shard_units(seq) == [*seq.encoder, *seq.decoder]
    assert shard_units(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))) == []  # no list: the root alone


def test_meta_skeleton_keeps_ties_and_flags():
    model = Llama(
        LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, multiple_of=16, max_seq_len=16, tie_embeddings=True)
    )
    model.norm.weight.requires_grad_(False)
    skeleton = meta_skeleton(model)
    assert all(p.is_meta for p in skeleton.parameters())
    assert skeleton.lm_head.weight is skeleton.embed_tokens.weight
    assert not skeleton.norm.weight.requires_grad and skeleton.layers[0].mlp.up_proj.weight.requires_grad
    assert not any(p.is_meta for p in model.parameters())  # the model itself is untouched


def test_fsdp_without_torchrun_is_a_one_line_error(plain_process, tmp_path):
    with pytest.raises(ConfigError, match="expected a run started by torchrun") as e:
        fit(tiny_llama(), next_token_loss, windows(), config(parallel="fsdp", out_dir=str(tmp_path / "run")))
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(parallel="zero3"), "unknown parallel 'zero3'"),
        (dict(cpu_offload=True), "cpu_offload: expected parallel 'fsdp'"),
        (dict(parallel="fsdp", cpu_offload=1), "cpu_offload: expected True or False"),
    ],
)
def test_train_config_checks_parallel_fields(kw, match):
    with pytest.raises(ConfigError, match=match):
        config(**kw)


class Interrupt(Exception):
    pass


def stop_after(k: int):
    def cb(step, logs):
        if step == k:
            raise Interrupt

    return cb


def test_fsdp_in_a_group_of_one_matches_plain_fit_and_its_checkpoint_exports(group_of_one, tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    sharded = fit(tiny_llama(), next_token_loss, windows(), config(parallel="fsdp", ckpt_every=2, out_dir=run))
    ckpt = tmp_path / "run" / "checkpoint"
    assert is_sharded(ckpt) and json.loads((ckpt / "trainer_state.json").read_text())["step"] == 4
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob(".metadata"))  # safetensors + JSON only
    for key in TORCHRUN_VARS:
        monkeypatch.delenv(key, raising=False)
    plain = fit(tiny_llama(), next_token_loss, windows(), config())
    for (name, a), b in zip(sharded.model.state_dict().items(), plain.model.state_dict().values()):
        assert type(a) is torch.Tensor  # a plain module came back, not DTensor shards
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    # the sharded checkpoint as one save_pretrained directory, loaded by the model's own loader
    export_pretrained(ckpt, tiny_llama(seed=3), tmp_path / "export")
    exported = Llama.from_pretrained(tmp_path / "export")
    for (name, a), b in zip(exported.state_dict().items(), sharded.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_interrupted_fsdp_run_resumes_in_a_plain_process(group_of_one, tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    with pytest.raises(Interrupt):
        fit(
            tiny_llama(), next_token_loss, windows(), config(steps=6, parallel="fsdp", ckpt_every=2, out_dir=run),
            callbacks=[stop_after(3)],
        )  # fmt: skip
    for key in TORCHRUN_VARS:
        monkeypatch.delenv(key, raising=False)
    assert not dist.is_initialized()
    resumed = fit(
        tiny_llama(seed=9), next_token_loss, windows(), config(steps=6, ckpt_every=2, out_dir=run, resume=True)
    )
    whole = fit(tiny_llama(), next_token_loss, windows(), config(steps=6))
    assert resumed.step == 6 and [r["step"] for r in resumed.history] == list(range(1, 7))
    for a, b in zip(resumed.model.parameters(), whole.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not is_sharded(tmp_path / "run" / "checkpoint")  # the plain process wrote its own format


def test_fsdp_refuses_what_it_cannot_shard(group_of_one, tmp_path):
    with pytest.raises(ConfigError, match="ema_decay: an EMA copy is not sharded"):
        fit(tiny_llama(), next_token_loss, windows(), config(parallel="fsdp", ema_decay=0.9))
    model = tiny_llama()
    with pytest.raises(ConfigError, match="fit builds AdamW itself"):
        fit(model, next_token_loss, windows(), config(parallel="fsdp"), optimizer=torch.optim.AdamW(model.parameters()))
    frozen = tiny_llama().requires_grad_(False)
    with pytest.raises(ConfigError, match="expected a model with trainable parameters, got Llama"):
        fit(frozen, next_token_loss, windows(), config(parallel="fsdp"))
    with torch.device("meta"):
        on_meta = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="a model on the meta device needs an init_weights"):
        fit(on_meta, lambda m, b, g: m(b).sum(), torch.zeros(8, 2), config(parallel="fsdp"))


def test_checkpoint_formats_that_do_not_fit_are_checkpoint_errors(group_of_one, tmp_path, monkeypatch):
    fit(tiny_llama(), next_token_loss, windows(), config(parallel="fsdp", steps=2, out_dir=str(tmp_path / "sharded")))
    bigger = Llama(dataclasses.replace(tiny_llama().config, dim=64))
    with pytest.raises(
        CheckpointError, match=r"does not match the model: ValueError: Size mismatch .*embed_tokens"
    ) as e:
        fit(bigger, next_token_loss, windows(), config(parallel="fsdp", out_dir=str(tmp_path / "sharded"), resume=True))
    assert "\n" not in str(e.value)
    for key in TORCHRUN_VARS:
        monkeypatch.delenv(key, raising=False)
    fit(tiny_llama(), next_token_loss, windows(), config(steps=2, out_dir=str(tmp_path / "replicated")))
    for key, value in {"WORLD_SIZE": "1", "RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_PORT", str(s.getsockname()[1]))
    resume = config(parallel="fsdp", steps=3, out_dir=str(tmp_path / "replicated"), resume=True)
    with pytest.raises(CheckpointError, match="cannot be resumed under parallel 'fsdp'; resume it with parallel 'ddp'"):
        fit(tiny_llama(), next_token_loss, windows(), resume)


def test_cpu_offload_needs_a_gpu(group_of_one):
    with pytest.raises(ConfigError, match="cpu_offload: expected a CUDA device .*got cpu"):
        fit(tiny_llama(), next_token_loss, windows(), config(parallel="fsdp", cpu_offload=True))


def test_failed_sharded_save_keeps_the_previous_checkpoint(group_of_one, tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    fit(tiny_llama(), next_token_loss, windows(), config(parallel="fsdp", steps=2, out_dir=run))
    before = {p.name: p.read_bytes() for p in (tmp_path / "run" / "checkpoint").iterdir()}

    def crash(path, text):  # the shards are written; the state file that completes them is not
        raise OSError("disk full")

    monkeypatch.setattr(dcp_module, "atomic_write_text", crash)
    with pytest.raises(OSError, match="disk full"):
        fit(tiny_llama(), next_token_loss, windows(), config(parallel="fsdp", steps=4, out_dir=run, resume=True))
    monkeypatch.undo()
    assert sorted(set(os.listdir(tmp_path / "run")) - {"tensorboard"}) == ["checkpoint", "log.jsonl"]  # no temporaries
    after = {p.name: p.read_bytes() for p in (tmp_path / "run" / "checkpoint").iterdir()}
    assert after == before


def test_fsdp_with_activation_checkpointing_takes_the_same_steps(group_of_one):
    recomputed = fit(tiny_llama(), next_token_loss, windows(), config(parallel="fsdp", activation_checkpointing=True))
    assert recomputed.model.activation_checkpointing is False  # put back, on the returned model too
    for key in TORCHRUN_VARS:
        os.environ.pop(key, None)  # the fixture's monkeypatch restores them
    plain = fit(tiny_llama(), next_token_loss, windows(), config())
    for a, b in zip(recomputed.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_meta_model_is_materialised_shard_by_shard(group_of_one):
    with torch.device("meta"):
        model = tiny_llama()
    res = fit(model, next_token_loss, windows(), config(parallel="fsdp", steps=1, lr=1e-9, grad_clip=None))
    weights = res.model.state_dict()
    assert not any(t.is_meta for t in weights.values())
    assert torch.allclose(weights["norm.weight"], torch.ones(32))  # reset_parameters: norms start at 1
    std = weights["layers.0.mlp.up_proj.weight"].std().item()
    assert 0.015 < std < 0.025  # init_weights: N(0, 0.02)
    assert res.history[0]["loss"] == pytest.approx(torch.log(torch.tensor(64.0)).item(), abs=0.1)  # ~ uniform


class TiedToy(nn.Module):
    """Embedding and output head sharing one matrix, two blocks, a deterministic init_weights."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight

    def init_weights(self) -> None:
        for i, p in enumerate(self.parameters()):
            p.fill_(0.05 * (i + 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = torch.tanh(block(x)) + x
        return self.head(x)


def tied_loss(model, batch, generator):
    logits = model(batch[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, 16), batch[:, 1:].reshape(-1))


def test_tied_weights_stay_tied_through_meta_init_sharding_and_gathering(group_of_one):
    data = torch.randint(0, 16, (32, 5), generator=torch.Generator().manual_seed(0))
    with torch.device("meta"):
        on_meta = TiedToy()
    sharded = fit(on_meta, tied_loss, data, config(parallel="fsdp"))
    assert sharded.model.head.weight is sharded.model.embed.weight
    for key in TORCHRUN_VARS:
        os.environ.pop(key, None)  # the fixture's monkeypatch restores them
    plain_model = TiedToy()
    with torch.no_grad():
        plain_model.init_weights()
    plain = fit(plain_model, tied_loss, data, config())
    for (name, a), b in zip(sharded.model.named_parameters(), plain.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)  # both uses' gradients reached the one matrix


def test_a_meta_model_without_fsdp_is_a_one_line_error(plain_process):
    with torch.device("meta"):
        model = tiny_llama()
    with pytest.raises(
        ConfigError, match="materialised by FSDP only; expected parallel 'fsdp' under torchrun, got 'auto'"
    ):
        fit(model, next_token_loss, windows(), config())
