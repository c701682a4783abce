"""Synthetic tasks, accuracy, BLEU and the stdlib-doc split and pipeline."""

from __future__ import annotations

import pytest
import torch

from notelab.core.errors import ConfigError, DataError, ShapeError
from notelab.seq.tasks import (
    BOS_ID,
    DIGIT,
    EOS_ID,
    MARKED,
    PAD_ID,
    SYNTH_VOCAB_SIZE,
    StdlibDocTask,
    SyntheticTask,
    corpus_bleu,
    exact_match,
    make_task,
    sequence_accuracy,
    shift_right,
    stdlib_doc_split,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", ["copy", "reverse"])
def test_copy_and_reverse_targets(name: str) -> None:
    task = SyntheticTask(name, 7, batch_size=5)
    src, tgt_in, tgt_out = task(0, gen())
    assert src.shape == (5, 7) and tgt_in.shape == tgt_out.shape == (5, 8)
    expected = src if name == "copy" else src.flip(1)
    assert torch.equal(tgt_out[:, :-1], expected)
    assert (tgt_out[:, -1] == EOS_ID).all() and (tgt_in[:, 0] == BOS_ID).all()
    assert torch.equal(tgt_in[:, 1:], tgt_out[:, :-1])  # teacher forcing: shifted right
    assert src.min() >= DIGIT and src.max() < DIGIT + 10


def test_adding_target_is_the_sum_of_the_marked_values() -> None:
    task = SyntheticTask("adding", 40, batch_size=64)
    src, tgt_in, tgt_out = task(3, gen(1))
    marked = src >= MARKED
    assert (marked.sum(1) == 2).all()
    # the first marker lies in the first L // 10 positions (Hochreiter & Schmidhuber 1997)
    assert (marked[:, :4].sum(1) >= 1).all()
    values = torch.where(marked, src - MARKED, torch.zeros_like(src)).sum(1)
    got = (tgt_out[:, 0] - DIGIT) * 10 + (tgt_out[:, 1] - DIGIT)
    assert torch.equal(got, values)
    assert (tgt_out[:, 2] == EOS_ID).all() and tgt_in.shape == (64, 3)
    assert src.max() < SYNTH_VOCAB_SIZE


def test_batches_are_a_function_of_the_generator() -> None:
    task = SyntheticTask("copy", 5, batch_size=3)
    a, b = task(0, gen(7)), task(0, gen(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], task(0, gen(8))[0])


def test_shift_right_puts_eos_after_the_last_real_token() -> None:
    y = torch.tensor([[5, 6, 0], [5, 6, 7]])
    _, tgt_in, tgt_out = shift_right(y)
    assert tgt_out.tolist() == [[5, 6, EOS_ID, PAD_ID], [5, 6, 7, EOS_ID]]
    assert tgt_in.tolist() == [[BOS_ID, 5, 6, PAD_ID], [BOS_ID, 5, 6, 7]]


def test_sequence_accuracy() -> None:
    tgt = torch.tensor([[4, 5, EOS_ID, PAD_ID], [4, 5, 6, EOS_ID]])
    assert sequence_accuracy(tgt, tgt) == (1.0, 1.0)
    pred = torch.tensor([[4, 5, EOS_ID, 9], [4, 9, 6, EOS_ID]])  # wrong token only in row 1; pad position ignored
    exact, tok = sequence_accuracy(pred, tgt)
    assert exact == 0.5 and tok == pytest.approx(6 / 7)
    short = torch.tensor([[4, 5], [4, 5]])  # too short: the missing EOS counts as wrong
    assert sequence_accuracy(short, tgt)[0] == 0.0


def test_bad_task_settings() -> None:
    with pytest.raises(ConfigError, match="unknown task"):
        make_task("sort")
    with pytest.raises(ConfigError, match="length"):
        SyntheticTask("copy", 0)
    with pytest.raises(ConfigError, match="length"):
        SyntheticTask("adding", 1)
    task = SyntheticTask("copy", 4)
    with pytest.raises(DataError, match=r"\[0, 23\)"):
        task.encode_input("3 4 99")
    with pytest.raises(ShapeError, match="non-empty"):
        task.encode_input("   ")


def test_bleu_and_exact_match() -> None:
    refs = ["Return the sum of two numbers.", "Open the file and read it."]
    assert corpus_bleu(refs, refs) == pytest.approx(100.0)
    assert exact_match(refs, refs) == 1.0
    assert corpus_bleu(["nothing alike here", "zzz"], refs) < 10.0
    assert exact_match(["Return the sum of two numbers.", "x"], refs) == 0.5
    with pytest.raises(ShapeError):
        corpus_bleu(["a"], refs)


def test_stdlib_doc_split_by_module_and_pipeline(tmp_path) -> None:
    train, test = stdlib_doc_split()
    assert len(train) > 1000 and len(test) > 100
    assert not {r.module for r in train} & {r.module for r in test}
    assert not {r.source for r in train} & {r.source for r in test}

    task = StdlibDocTask(
        run_dir=str(tmp_path), vocab_size=400, max_src_len=48, max_tgt_len=10, batch_size=4, max_train=120, max_test=6
    )
    assert (tmp_path / "tokenizer.json").is_file()
    src, tgt_in, tgt_out = task(0, gen())
    assert src.shape[0] == 4 and src.shape[1] <= 48 and tgt_out.shape[1] <= 11
    assert ((tgt_out == task.eos_id).sum(1) == 1).all()
    assert src.max() < task.vocab
    # the target decodes back to (a prefix of) a summary
    summaries = {r.summary for r in task.train_records}
    text = task.decode_output(tgt_out[0].tolist())
    assert any(s.startswith(text) for s in summaries)
    # a second task on the same run dir reuses the cached tokenizer
    again = StdlibDocTask(run_dir=str(tmp_path), vocab_size=400, max_src_len=48, max_tgt_len=10, max_test=6)
    assert again.tokenizer.encode("def f(x): return x") == task.tokenizer.encode("def f(x): return x")
    batches = list(task.test_batches(4))
    assert sum(len(refs) for _, refs in batches) == 6
