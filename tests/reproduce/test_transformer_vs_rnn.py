"""The transformer-vs-rnn claim runs end to end (tiny settings: every code path, seconds of compute)."""

from __future__ import annotations

from notelab.reproduce.base import VERDICTS
from notelab.reproduce.transformer_vs_rnn import run


def test_claim_runs_end_to_end_tiny(tmp_path) -> None:
    result = run(tmp_path, seed=0, tiny=True)
    assert result.name == "transformer-vs-rnn" and result.verdict in VERDICTS
    assert len(result.tables) == 5 and len(result.figures) == 3
    for fig in result.figures:
        assert (tmp_path / fig.path).stat().st_size > 1000
    throughput = result.tables[0]
    assert len(throughput.rows) == 2 and all(v > 0 for row in throughput.rows for v in row[2:])
    grads = result.settings["decay_init"]
    assert set(grads) == {"transformer", "lstm", "gru", "rnn"}
    doc = result.tables[-1]
    assert [row[0] for row in doc.rows] == ["transformer", "lstm", "gru", "rnn"]
    assert all(0.0 <= row[4] <= 100.0 for row in doc.rows)
    assert (tmp_path / "stdlib-doc" / "tokenizer.json").is_file()
