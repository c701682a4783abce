"""Training adapters through notelab.train.fit (adapter-only checkpoints, exact resume) and the CLI verbs."""

import json

import pytest
import torch

import notelab.cli as cli
from notelab.core.checkpoint import load_weights
from notelab.data.tokenizer import Tokenizer
from notelab.lm import Llama, LlamaConfig
from notelab.lm.data import TensorDictDataset
from notelab.lm.posttrain import sft_loss
from notelab.peft import LoraConfig, get_peft_model
from notelab.train import TrainConfig, fit

CFG = dict(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=64)


def batch_data():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 61, (16, 12), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    return TensorDictDataset({"input_ids": ids, "labels": labels})


def run(tmp, steps, resume=False):
    torch.manual_seed(0)
    peft = get_peft_model(Llama(LlamaConfig(**CFG)), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    cfg = TrainConfig(steps=steps, batch_size=4, lr=1e-2, out_dir=str(tmp), resume=resume, ckpt_every=2,
                      progress=False, log_every=1, schedule="constant")  # fmt: skip
    return fit(peft, sft_loss, batch_data(), cfg)


def test_fit_checkpoints_hold_only_the_adapter_and_resume_exactly(tmp_path):
    full = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    stored = load_weights(tmp_path / "b" / "checkpoint" / "model.safetensors")
    assert stored and all(".lora_" in k for k in stored), sorted(stored)[:3]
    assert sum(t.numel() for t in stored.values()) == 2 * (2 * (32 + 32) + 2 * (32 + 16))  # layers x (q + v)
    resumed = run(tmp_path / "b", 4, resume=True)
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=k)
    torch.manual_seed(0)
    untouched = Llama(LlamaConfig(**CFG)).state_dict()
    trained = full.model.base_model.state_dict()
    assert all(torch.equal(trained[k], v) for k, v in untouched.items() if k in trained)  # the base stays frozen
    assert full.model.base_model.layers[0].self_attn.q_proj.lora_B["default"].weight.abs().sum() > 0


@pytest.fixture
def base_dir(tmp_path):
    texts = [f"def f{i}(x):\n    return x + {i}\n" for i in range(40)]
    tok = Tokenizer.train(texts, vocab_size=300)
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**{**CFG, "vocab_size": 300, "max_seq_len": 128}))
    out = tmp_path / "base"
    model.save_pretrained(out)
    tok.save(out)
    return out


def test_cli_train_merge_estimate(base_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", ("notelab.cli.peft",))
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"def f{i}(x):", "response": f" return {i}"}) for i in range(8)))
    out = tmp_path / "run"
    args = ["peft", "train", "--base", str(base_dir), "--data", str(data), "--out", str(out), "--steps", "3",
            "--batch-size", "4", "--no-progress", "--max-len", "32", "--ckpt-every", "2"]  # fmt: skip
    assert cli.main(args) == 0
    said = capsys.readouterr().out
    assert "lora:" in said and "parameters trained" in said
    assert (out / "adapter" / "adapter_config.json").is_file() and (
        out / "adapter" / "adapter_model.safetensors"
    ).is_file()
    identity = json.loads((out / "base.json").read_text())
    assert len(identity["sha256"]) == 64 and not (out / "checkpoint" / "model.safetensors").stat().st_size > 200_000
    assert cli.main([*args, "--resume"]) == 0 and "already" in capsys.readouterr().out
    # --resume against another base: the run names its base by SHA-256
    other = tmp_path / "other"
    torch.manual_seed(1)
    Llama(LlamaConfig(**{**CFG, "vocab_size": 300, "max_seq_len": 128})).save_pretrained(other)
    Tokenizer.from_file(base_dir).save(other)
    assert cli.main([*args[:3], str(other), *args[4:-2], "--ckpt-every", "1", "--steps", "5", "--resume"]) == 2
    assert "SHA-256" in capsys.readouterr().err
    prefix = ["--method", "prefix", "--num-virtual-tokens", "2", "--steps", "1"]
    assert cli.main([*args[:7], str(tmp_path / "prefix"), *args[8:], *prefix]) == 0
    assert "prefix:" in capsys.readouterr().out
    merged = tmp_path / "merged"
    assert (
        cli.main(["peft", "merge", "--base", str(base_dir), "--adapter", str(out / "adapter"), "--out", str(merged)])
        == 0
    )
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    assert cli.main(["peft", "estimate", "--model", "qwen1.5-7b", "--method", "lora"]) == 0
    table = capsys.readouterr().out
    assert "qwen1.5-7b full" in table and "qwen1.5-7b lora" in table
    assert cli.main(["peft", "estimate", "--model", "qwen1.5-7b", "--method", "full", "--world-size", "8"]) == 0
    sharded = capsys.readouterr().out
    assert "per GPU of 8 (FSDP)" in sharded and "qwen1.5-7b full" in sharded
    # bad input: one line, exit 2, nothing written
    assert cli.main(["peft", "estimate", "--model", "gpt5"]) == 2
    assert "expected a preset" in capsys.readouterr().err
    assert cli.main([*args[:7], str(tmp_path / "r2"), "--method", "dora"]) == 2
    assert "unknown --method 'dora'" in capsys.readouterr().err and not (tmp_path / "r2").exists()
    assert cli.main([*args[:7], str(tmp_path / "r3"), "--target-modules", "qkv"]) == 2
    assert "matched no Linear / Embedding module; available:" in capsys.readouterr().err
