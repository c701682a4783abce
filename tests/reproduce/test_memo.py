"""A claim's run that was stopped picks up where it stopped (notelab.reproduce.memo): finished pieces are read
back, not computed again, and the result equals an uninterrupted run's; a piece that does not read back is
computed again; the memo is gone once the result is written."""

from __future__ import annotations

import sys
import types

import pytest

from notelab.reproduce import CLAIMS, memo, report, run_claim
from notelab.reproduce.memo import MEMO_DIR, Memo


def test_a_piece_is_computed_once_per_fingerprint(tmp_path) -> None:
    calls = []

    def piece() -> dict:
        calls.append(1)
        return {"rates": [[1.5, float("nan")]], "n": 3}

    a = Memo(tmp_path, claim="c", seed=0)
    first = a.value("throughput-cpu", piece)
    again = Memo(tmp_path, claim="c", seed=0).value("throughput-cpu", piece)  # a new process, same run
    assert len(calls) == 1 and again["n"] == 3 and again["rates"][0][0] == 1.5 and first["n"] == 3
    Memo(tmp_path, claim="c", seed=1).value("throughput-cpu", piece)  # another seed: its own pieces
    assert len(calls) == 2
    Memo(None, claim="c", seed=0).value("throughput-cpu", piece)  # nothing kept
    assert len(calls) == 3
    assert a.pieces() == 1 and a.folder("x") == a.root / "x"


@pytest.mark.parametrize("damage", [b"", b"{not json", b"\xff\xfe", b'{"key": "other", "value": 1}', b"[1, 2]"])
def test_a_piece_that_does_not_read_back_is_computed_again(tmp_path, damage) -> None:
    m = Memo(tmp_path, claim="c")
    m.value("k", lambda: 1)
    (m.root / "k.json").write_bytes(damage)
    assert m.value("k", lambda: 2) == 2 and Memo(tmp_path, claim="c").value("k", lambda: 3) == 2


def test_keys_are_file_names_inside_the_memo(tmp_path) -> None:
    for bad in ["../escape", "a/b", "", ".hidden", "x" * 200]:
        with pytest.raises(ValueError, match="expected a key"):
            Memo(tmp_path).value(bad, lambda: 1)


def test_the_memo_is_removed_once_the_result_is_written(tmp_path, monkeypatch) -> None:
    from notelab.reproduce.base import ClaimResult

    def run(out_dir, quick=False, seed=0, progress=None):
        Memo(out_dir, claim="fake", seed=seed).value("piece", lambda: 1)
        assert (out_dir / MEMO_DIR).is_dir()
        return ClaimResult(name="fake", title="F", claim="c", verdict="holds", summary="s")

    module = types.ModuleType("notelab_fake_claim")
    module.run = run
    monkeypatch.setitem(sys.modules, "notelab_fake_claim", module)
    monkeypatch.setitem(CLAIMS, "fake", "notelab_fake_claim")
    run_claim("fake", tmp_path)
    assert (tmp_path / "fake" / "result.json").is_file() and not (tmp_path / "fake" / MEMO_DIR).exists()
    memo.clear(tmp_path / "nothing-here")  # no memo: nothing to do


def test_transformer_vs_rnn_stopped_mid_way_resumes_to_the_same_result(tmp_path, monkeypatch) -> None:
    """A stop in the 5th of the 8 trainings of part (2) (tiny settings): run again, only the 4 missing trainings
    and part (4) train; the copy models of part (3) come back from their checkpoints; accuracies and the
    trained models' gradient decay equal an uninterrupted run's."""
    from notelab.reproduce import transformer_vs_rnn as claim

    real = claim.train_seq
    calls: list[str] = []

    def counted(model_name, *args, **kw):
        calls.append(model_name)
        if stop_at and len(calls) == stop_at:
            raise KeyboardInterrupt("stopped")
        return real(model_name, *args, **kw)

    monkeypatch.setattr(claim, "train_seq", counted)
    stop_at = 0
    whole = claim.run(tmp_path / "whole", tiny=True)
    assert len(calls) == 8 + 4  # (2): 2 tasks x 1 length x 4 models; (4): 4 models

    calls.clear()
    stop_at = 5
    with pytest.raises(KeyboardInterrupt):
        claim.run(tmp_path / "stopped", tiny=True)
    calls.clear()
    stop_at = 0
    resumed = claim.run(tmp_path / "stopped", tiny=True)
    assert len(calls) == 4 + 4
    # the report says its times are the last sitting's: CPU throughput and 4 trainings came from the first
    assert (whole.resumed_pieces, resumed.resumed_pieces) == (0, 1 + 4)
    assert "last sitting" in report._section(resumed) and "last sitting" not in report._section(whole)
    assert resumed.settings["token_accuracy"] == whole.settings["token_accuracy"]
    assert resumed.tables[1].rows == whole.tables[1].rows  # exact match per task and model
    assert resumed.settings["decay_trained"] == pytest.approx(whole.settings["decay_trained"], abs=1e-6)


def test_a_changed_recipe_does_not_reuse_the_old_ones_pieces(tmp_path) -> None:
    recipe = tmp_path / "claim.py"
    recipe.write_text("STEPS = 100\n")
    assert Memo(tmp_path, recipe, claim="c").value("k", lambda: 1) == 1
    assert Memo(tmp_path, recipe, claim="c").value("k", lambda: 2) == 1
    recipe.write_text("STEPS = 200\n")
    assert Memo(tmp_path, recipe, claim="c").value("k", lambda: 3) == 3
