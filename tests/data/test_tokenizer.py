import pytest

from notelab.core.errors import ConfigError, DataError
from notelab.data.tokenizer import BOS, EOS, Tokenizer

TEXTS = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int = 0\n"] * 50


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXTS, vocab_size=300)


def test_round_trip_any_text_including_unseen_scripts(tok):
    for text in ["def add(a, b):", "héllo wörld", "日本語 🙂", ""]:
        assert tok.decode(tok.encode(text)) == text


def test_merges_shorten_frequent_text(tok):
    text = TEXTS[0]
    assert len(tok.encode(text)) < len(text.encode()) / 2


def test_specials_and_bos_eos(tok):
    ids = tok.encode("x", add_bos=True, add_eos=True)
    assert ids[0] == tok.token_to_id(BOS) == tok.bos_id and ids[-1] == tok.eos_id == tok.token_to_id(EOS)
    assert tok.decode(ids) == "x"
    assert tok.pad_id == 0


def test_save_and_load_tokenizer_json(tok, tmp_path):
    tok.save(tmp_path)
    again = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert again.encode(TEXTS[1]) == tok.encode(TEXTS[1]) and again.vocab_size == tok.vocab_size


def test_bad_input(tok, tmp_path):
    with pytest.raises(DataError, match="found none"):
        Tokenizer.from_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        Tokenizer.from_file(tmp_path / "bad.json")
    n = tok.vocab_size
    with pytest.raises(DataError, match=rf"token ids must be in \[0, {n}\), got \[{n}\]"):
        tok.decode([1, n])
    with pytest.raises(ConfigError, match="vocab_size must be at least"):
        Tokenizer.train(TEXTS, vocab_size=100)
