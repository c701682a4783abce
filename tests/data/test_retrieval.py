import json

import pytest

from notelab.core.errors import ConfigError, DataError
from notelab.data.retrieval import BM25Index, Passage, chunk_text

FACTS = [
    "The os.path.join function joins one or more path components intelligently.",
    "The json module encodes and decodes JSON documents; json.dumps returns a string.",
    "Dogs bark loudly at night when the moon is full.",
    "The itertools module provides chain, cycle, and repeat for efficient looping.",
]


def test_query_finds_the_matching_passage_scores_non_increasing():
    index = BM25Index.from_texts(FACTS, sources=["a", "b", "c", "d"])
    assert len(index) == 4
    hits = index.search("which module decodes json documents", k=3)
    assert isinstance(hits[0], Passage) and hits[0].source == "b" and hits[0].text == FACTS[1]
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0
    assert index.search("path join components")[0].source == "a"


def test_k_larger_than_the_index_and_unmatched_queries():
    index = BM25Index.from_texts(FACTS)
    hits = index.search("the module", k=50)  # matches two passages; no passage twice, no zero scores
    assert 1 <= len(hits) <= len(index) and len({h.source for h in hits}) == len(hits)
    assert all(h.score > 0 for h in hits)
    assert index.search("zebra quantum", k=5) == []  # nothing shares a term: no evidence
    assert index.search("the of a", k=5) == []  # stop words only
    with pytest.raises(ConfigError, match="k a positive integer"):
        index.search("json", k=0)


def test_from_folder_reads_text_markdown_and_jsonl(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "notes.txt").write_text("First paragraph about turtles.\n\nSecond one about comets and tails.\n")
    (tmp_path / "sub" / "doc.md").write_text("# Volcano\n\nMagma rises through the crust of the volcano.\n")
    rows = [{"text": "Saturn has rings of ice.", "title": "Saturn"}, {"text": "Kiwi birds cannot fly.", "source": "K"}]
    (tmp_path / "kb.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "ignored.csv").write_text("text\nnot indexed zebra\n")
    index = BM25Index.from_folder(tmp_path, chunk_words=6)
    sources = set(index.sources)
    assert {"kb.jsonl:1", "K", "notes.txt:1", "notes.txt:3", "sub/doc.md:1"} <= sources
    assert index.search("magma crust")[0].source.startswith("sub/doc.md:")
    assert index.search("ice rings")[0].text == "Saturn\nSaturn has rings of ice."
    assert index.search("zebra") == []
    assert len(BM25Index.from_folder(tmp_path / "kb.jsonl")) == 2  # one file works too


def test_chunk_text_packs_paragraphs_and_splits_long_ones():
    text = "a b c\n\nd e\n\n" + " ".join(f"w{i}" for i in range(7)) + "\nmore\n"
    chunks = chunk_text(text, 5)
    assert chunks[0] == (1, "a b c d e")  # two short paragraphs in one passage
    assert [line for line, _ in chunks[1:]] == [5, 5]
    assert chunks[1][1] == "w0 w1 w2 w3 w4" and chunks[2][1] == "w5 w6 more"
    assert all(len(c.split()) <= 5 for _, c in chunks)


@pytest.mark.parametrize(
    "content, words",
    [
        ('{"text": "ok"}\n{"text": \n', r"kb.jsonl:2: expected a JSON object, got malformed JSON"),
        ('{"text": "ok"}\n\n["a list"]\n', r"kb.jsonl:3: expected an object with a non-empty string \"text\""),
        ('{"title": "no text"}\n', r"kb.jsonl:1: .*got keys \['title'\]"),
        ('{"text": "x y", "title": 3}\n', r'kb.jsonl:1: expected "title" to be a string'),
    ],
)
def test_bad_rows_are_named_by_file_and_line(tmp_path, content, words):
    (tmp_path / "kb.jsonl").write_text(content)
    with pytest.raises(DataError, match=words) as e:
        BM25Index.from_folder(tmp_path)
    assert "\n" not in str(e.value)


def test_empty_sources_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="got none"):
        BM25Index.from_folder(tmp_path)  # an empty folder
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    with pytest.raises(DataError, match="got none"):
        BM25Index.from_folder(tmp_path)
    with pytest.raises(DataError, match="absent"):
        BM25Index.from_folder(tmp_path / "missing")
    with pytest.raises(DataError, match="empty source"):
        BM25Index.from_texts([])
    with pytest.raises(DataError, match="stop words"):
        BM25Index.from_texts(["the a of", "!!"])
    with pytest.raises(ConfigError, match="one source per text"):
        BM25Index.from_texts(["x y"], sources=["a", "b"])
    (tmp_path / "bad.md").write_bytes(b"\xff\xfe bad")
    with pytest.raises(DataError, match="bad.md: expected UTF-8"):
        BM25Index.from_folder(tmp_path)


def test_importing_notelab_data_does_not_import_bm25s():
    """bm25s's import can start JAX on a GPU (75% of its memory): it loads only when an index is built."""
    import subprocess
    import sys

    code = "import sys, notelab.data, notelab.hallucination; print('bm25s' in sys.modules, 'jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
