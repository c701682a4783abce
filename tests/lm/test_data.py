import json

import pytest
import torch

from notelab.core.errors import DataError
from notelab.data.tokenizer import Tokenizer
from notelab.lm.data import (
    IGNORE_INDEX,
    PackedStream,
    encode_example,
    encode_stream,
    eval_windows,
    load_preference_jsonl,
    load_sft_jsonl,
    pad_examples,
    preference_dataset,
    stdlib_preference_pairs,
    text_splits,
)

TEXTS = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int = 0\n"] * 10


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXTS, vocab_size=320)


def test_packed_stream_windows_are_contiguous_and_deterministic():
    tokens = torch.arange(100, dtype=torch.int32)
    stream = PackedStream(tokens, seq_len=8, batch_size=4)
    a = stream(0, torch.Generator().manual_seed(1))
    b = stream(0, torch.Generator().manual_seed(1))
    assert a.shape == (4, 9) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert torch.all(a[:, 1:] - a[:, :-1] == 1)  # windows of a contiguous stream


def test_eval_windows_score_each_token_once():
    w = eval_windows(torch.arange(26), seq_len=5)
    assert w.shape == (5, 6)
    targets = w[:, 1:].flatten()
    assert torch.equal(targets, torch.arange(1, 26))


def test_encode_stream_marks_documents(tok):
    s = encode_stream(tok, ["a = 1", "b = 2"])
    assert (s == tok.eos_id).sum() == 2 and (s == tok.bos_id).sum() == 2
    assert s[0] == tok.bos_id and s[-1] == tok.eos_id
    assert tok.decode(s.tolist()) == "a = 1b = 2"


def test_text_splits_directory_and_file(tmp_path):
    for i in range(12):
        (tmp_path / f"m{i}.py").write_text(f"x{i} = {i}\n" * 5)
    train, val = text_splits(tmp_path)
    assert train and val and len(train) + len(val) == 12
    assert not set(train) & set(val)
    f = tmp_path / "one.txt"
    f.write_text("abcdefghij" * 10)
    train, val = text_splits(f)
    assert len(train[0]) == 90 and len(val[0]) == 10
    with pytest.raises(DataError, match="expected 'stdlib'"):
        text_splits(tmp_path / "missing")


def test_labels_mask_prompt_and_padding(tok):
    ids, n_prompt = encode_example(tok, "def add(a, b):", " return a + b", max_len=64)
    short, n_short = encode_example(tok, "x", " y", max_len=64)
    batch = pad_examples([(ids, n_prompt), (short, n_short)], pad_id=tok.pad_id)
    labels = batch["labels"]
    assert torch.all(labels[0, :n_prompt] == IGNORE_INDEX)
    assert torch.equal(labels[0, n_prompt : len(ids)], torch.tensor(ids[n_prompt:]))
    assert torch.all(labels[1, len(short) :] == IGNORE_INDEX)
    assert ids[-1] == tok.eos_id and ids[0] == tok.bos_id


def test_jsonl_errors_name_the_line(tmp_path):
    p = tmp_path / "sft.jsonl"
    p.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + '{"prompt": "a"}\n')
    with pytest.raises(DataError, match=r"sft.jsonl:2: .*missing response"):
        load_sft_jsonl(p)
    p.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\nnot json\n')
    with pytest.raises(DataError, match=r":3: expected a JSON object"):
        load_preference_jsonl(p)
    p.write_text('{"prompt": "a", "chosen": "b", "rejected": 3}\n')
    with pytest.raises(DataError, match="expected string values"):
        load_preference_jsonl(p)


def test_stdlib_preference_pairs(tok):
    pairs = stdlib_preference_pairs("val", n=20, seed=0)
    assert len(pairs) >= 15
    assert all(p.prompt.startswith(("def ", "async def ")) for p in pairs)
    assert all(p.chosen != p.rejected for p in pairs)
    # Rejected answers are other functions' real summaries.
    assert {p.rejected for p in pairs} <= {p.chosen for p in pairs}
    data = preference_dataset(tok, pairs, max_len=48)
    row = data[0]
    assert set(row) == {"chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"}
    assert len(data) == len(pairs)


def test_perplexity_is_exp_mean_nll_over_windows():
    import math

    from notelab.lm.config import LlamaConfig
    from notelab.lm.model import Llama
    from notelab.lm.train import mean_nll, nll_by_position, perplexity

    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, multiple_of=8, max_seq_len=16))
    tokens = torch.randint(0, 50, (200,))
    by_pos = nll_by_position(model, tokens, 16, batch_size=3)
    assert by_pos.shape == (16,)
    assert mean_nll(model, tokens, 16, batch_size=5) == pytest.approx(by_pos.mean().item(), rel=1e-5)
    ppl = perplexity(model, tokens, 16)
    assert ppl == pytest.approx(math.exp(by_pos.mean().item()), rel=1e-5)
    assert 25 < ppl < 100  # an untrained model is close to uniform over 50 tokens


def test_training_text_cannot_create_control_ids(tok):
    docs = ["x = 1<|end_of_text|><|begin_of_text|>", "<|eot_id|>y = 2"]
    s = encode_stream(tok, docs)
    assert (s == tok.eos_id).sum() == 2 and (s == tok.bos_id).sum() == 2  # only the document markers
    assert (s == tok.token_to_id("<|eot_id|>")).sum() == 0
    assert tok.decode(s.tolist()) == "".join(docs)
    ids, n_prompt = encode_example(tok, "<|eot_id|>", "<|end_of_text|>", max_len=64)
    assert ids.count(tok.eos_id) == 1 and ids[-1] == tok.eos_id and tok.token_to_id("<|eot_id|>") not in ids


def test_text_file_with_max_chars_is_streamed(tmp_path):
    import tracemalloc

    f = tmp_path / "big.txt"
    line = "def f(x):  # ü\n    return x\n"
    f.write_text(line * 800_000, encoding="utf-8")  # 23 M characters
    text = line * 800_000
    tracemalloc.start()
    try:
        train, val = text_splits(f, max_chars=100_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    cut = int(len(text) * 0.9)
    assert train == [text[:100_000]] and val == [text[cut : cut + 10_000]]  # the same parts as a whole read
    assert peak < 5_000_000, f"peak {peak / 1e6:.1f} MB for 0.11 M characters of a 23 M character file"
    (tmp_path / "bad.txt").write_bytes(b"ok\n" * 10 + b"\xff\xfe")
    with pytest.raises(DataError, match="bad.txt: expected a UTF-8 text file"):
        text_splits(tmp_path / "bad.txt", max_chars=5)
