import pytest

from notelab.core.errors import ConfigError
from notelab.data.text import stdlib_corpus, stdlib_files, stdlib_functions


def test_splits_are_disjoint_and_cover_all():
    train, val = set(stdlib_files("train")), set(stdlib_files("val"))
    assert train and val and not train & val
    assert train | val == set(stdlib_files("all"))
    assert 0.03 < len(val) / (len(train) + len(val)) < 0.2


def test_corpus_is_python_source_and_respects_max_chars():
    text = stdlib_corpus("val", max_chars=10_000)
    assert len(text) <= 10_000 + 2 * len(stdlib_files("val")) and "def " in text


@pytest.fixture(scope="module")
def val_functions():
    return stdlib_functions("val")


def test_functions_have_docstring_removed_and_summary(val_functions):
    assert len(val_functions) > 100
    for r in val_functions[:200]:
        assert r.source.startswith(r.signature) and r.signature.lstrip().startswith(("def ", "async def "))
        assert r.docstring.split()[0] not in r.source.split("\n")[1:2]  # the body starts after the docstring
        assert r.summary and r.summary.split()[0] in r.docstring
    assert len({r.source for r in val_functions}) == len(val_functions)
    train_modules = {r.module for r in stdlib_functions("train")}
    assert not train_modules & {r.module for r in val_functions}


def test_bad_split():
    with pytest.raises(ConfigError, match="expected one of train, val, all"):
        stdlib_files("test")


def test_read_texts_reads_only_what_max_chars_needs(tmp_path):
    import tracemalloc

    from notelab.data.text import read_texts

    big = tmp_path / "big.txt"
    big.write_text("x = 1  # é\n" * 2_000_000, encoding="utf-8")  # 22 M characters
    small = tmp_path / "small.txt"
    small.write_text("y = 2\n")
    tracemalloc.start()
    try:
        texts = list(read_texts([small, big, small], max_chars=100_000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [len(t) for t in texts] == [6, 100_000 - 6] and texts[1] == ("x = 1  # é\n" * 10_000)[: 100_000 - 6]
    assert peak < 4_000_000, f"peak {peak / 1e6:.1f} MB for 0.1 M characters of a 22 M character file"
    assert list(read_texts([small, big]))[1] == big.read_text(encoding="utf-8")  # no max_chars: whole files


def test_read_spans_and_count_chars_stream(tmp_path):
    from notelab.data.text import count_chars, read_spans

    p = tmp_path / "t.txt"
    text = "".join(f"{i:07d}é\n" for i in range(300_000))  # non-ASCII: characters, not bytes
    p.write_text(text, encoding="utf-8")
    assert count_chars(p) == len(text)
    assert read_spans(p, [(0, 5), (1_500_003, 20), (len(text) - 3, None)]) == [
        text[:5],
        text[1_500_003:1_500_023],
        text[-3:],
    ]
    (tmp_path / "crlf.txt").write_bytes(b"a\r\nb\r\n")
    assert count_chars(tmp_path / "crlf.txt") == 4 and read_spans(tmp_path / "crlf.txt", [(0, None)]) == ["a\nb\n"]
