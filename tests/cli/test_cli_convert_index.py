"""``notelab lm convert --from-hf`` on a shard index whose weight_map is not {tensor: file name}:
one error line, exit 2, no --out folder (issue #9; the library-level cases are in tests/lm)."""

from __future__ import annotations

import json

import pytest
import torch

from notelab.cli import main
from notelab.lm import Llama, LlamaConfig, to_hf


@pytest.mark.parametrize(
    "weight_map, match",
    [
        ({"model.norm.weight": 5}, "expected a shard file name, got 5"),
        ({"model.norm.weight": {"a": 1}}, "expected a shard file name"),
        ({"model.norm.weight": None}, "expected a shard file name"),
        (5, "expected a non-empty object 'weight_map'"),
        (None, "expected a non-empty object 'weight_map'"),
    ],
)
def test_bad_weight_map_is_one_line_and_exit_2(tmp_path, capsys, weight_map, match):
    torch.manual_seed(0)
    hf = tmp_path / "hf"
    config = LlamaConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, multiple_of=8, max_seq_len=16)
    to_hf(Llama(config), hf, max_shard_bytes=4000)
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    capsys.readouterr()
    assert main(["lm", "convert", "--from-hf", str(hf), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and match in err[0]
    assert not (tmp_path / "out").exists()
