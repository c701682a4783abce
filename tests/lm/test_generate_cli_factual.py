"""`notelab lm generate --factual-nucleus DECAY FLOOR`: the same tokens as generate() with the FactualNucleus the
tokenizer's sentence ends give, and bad numbers refused before the model loads."""

import torch

import notelab.cli as cli
from notelab.data.tokenizer import Tokenizer
from notelab.lm import Llama, LlamaConfig, generate
from notelab.lm.sampling import FactualNucleus


def run_folder(tmp_path):
    tok = Tokenizer.train(["One fact. Two facts! Three? Four.\nFive facts here. " * 8], vocab_size=300)
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=300, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16))
    folder = tmp_path / "run"
    tok.save(folder)
    model.save_pretrained(folder)
    return folder, model.eval(), tok


def test_cli_factual_nucleus_equals_generate(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", ("notelab.cli.lm",))
    folder, model, tok = run_folder(tmp_path)
    f = FactualNucleus.for_tokenizer(tok, 0.8, 0.5, 0.2)
    assert f.sentence_end_ids  # '.', '!', '?' and newline tokens exist in this vocabulary
    args = ["lm", "generate", "--checkpoint", str(folder), "--prompt-ids", "5,6,7", "--max-new-tokens", "12"]
    args += [
        "--temperature",
        "1.0",
        "--top-p",
        "0.8",
        "--factual-nucleus",
        "0.5",
        "0.2",
        "--seed",
        "4",
        "--device",
        "cpu",
    ]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out.strip()
    want = generate(model, [[5, 6, 7]], 12, temperature=1.0, top_p=f, seed=4, stop_tokens=[tok.eos_id])[0]
    assert printed == tok.decode([5, 6, 7]) + tok.decode(want)


def test_cli_factual_nucleus_bad_numbers_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", ("notelab.cli.lm",))
    args = ["lm", "generate", "--checkpoint", str(tmp_path / "absent"), "--prompt-ids", "1", "--temperature", "1"]
    assert cli.main([*args, "--factual-nucleus", "0.9", "0.95"]) == 2  # floor above p = 0.9: before any loading
    assert "floor <= p" in capsys.readouterr().err
