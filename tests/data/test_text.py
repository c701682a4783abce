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
