"""`--seed` seeds everything a run draws, model initialisation included: one seed, bit-identical weights on CPU.

Each family is trained twice with one seed and once with another, through the CLI (which is how
users run it) and, for the library entry points, without the CLI's own seeding: a run must not
depend on what the process drew before it.
"""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file

from notelab.cli import main


def _weights(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _disturb() -> None:
    """Draw from every global generator, as whatever ran earlier in the process would have."""
    torch.rand(17)
    random.random()


LM = ["lm", "train", "--data", "stdlib", "--max-chars", "20000", "--vocab-size", "300", "--steps", "2"]
LM += ["--batch-size", "2", "--seq-len", "16", "--no-progress", "--device", "cpu"]
DIFFUSION = ["diffusion", "train", "--data", "moons", "--steps", "2", "--batch-size", "8", "--no-progress"]
DIFFUSION += ["--device", "cpu"]
SEQ = ["seq", "train", "--model", "transformer", "--task", "copy", "--length", "4", "--steps", "2"]
SEQ += ["--batch-size", "4", "--d-model", "16", "--layers", "1", "--no-progress", "--device", "cpu"]


@pytest.mark.parametrize("argv", [LM, DIFFUSION, SEQ], ids=["lm", "diffusion", "seq"])
def test_cli_train_with_one_seed_gives_bit_identical_weights(argv, tmp_path):
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        _disturb()
        assert main([*argv, "--seed", str(seed), "--out", str(tmp_path / name)]) == 0
        runs[name] = _weights(tmp_path / name)
    assert _same(runs["a"], runs["b"])
    assert not _same(runs["a"], runs["c"])


def test_library_entry_points_seed_model_initialisation(tmp_path):
    from notelab.data import load_dataset
    from notelab.diffusion.pipeline import train_diffusion
    from notelab.lm.config import LlamaConfig
    from notelab.lm.train import prepare_data, pretrain
    from notelab.seq.tasks import make_task
    from notelab.seq.training import train_seq
    from notelab.train import TrainConfig

    def cfg(seed: int) -> TrainConfig:
        return TrainConfig(steps=1, batch_size=4, seed=seed, progress=False, device="cpu")

    data = prepare_data("stdlib", vocab_size=300, max_chars=20000)
    llama = LlamaConfig.from_name("llama-tiny", vocab_size=data.tokenizer.vocab_size)
    moons = load_dataset("moons")
    task = make_task("copy", length=4, batch_size=4)
    models = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        _disturb()
        lm = pretrain(llama, data, None, cfg(seed), seq_len=16).model.state_dict()
        _disturb()
        ddpm = train_diffusion(moons, tmp_path / f"ddpm-{name}", cfg(seed)).state_dict()
        _disturb()
        seq = train_seq("gru", task, None, cfg(seed), d_model=16, n_layers=1).model.state_dict()
        models[name] = (lm, ddpm, seq)
    for a, b, c in zip(models["a"], models["b"], models["c"]):
        assert _same(a, b)
        assert not _same(a, c)
