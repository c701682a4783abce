"""HaluEval-style detection files: the layouts, bad rows named by line, AUC against scikit-learn."""

import json

import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from notelab.core.errors import DataError
from notelab.hallucination.halueval import DetectionItem, evaluate_detector, load_halueval


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GENERAL = [
    {"ID": "1", "user_query": "q1", "chatgpt_response": "short", "hallucination": "no", "hallucination_spans": []},
    {"ID": "2", "user_query": "q2", "chatgpt_response": "a much longer answer", "hallucination": "yes"},
    {"ID": "3", "user_query": "q3", "chatgpt_response": "mid size", "hallucination": "no"},
    {"ID": "4", "user_query": "q4", "chatgpt_response": "longer response here", "hallucination": "yes"},
]


def test_general_layout_and_metrics_equal_sklearn(tmp_path):
    items = load_halueval(_write(tmp_path / "g.json", GENERAL))
    assert [i.hallucinated for i in items] == [False, True, False, True]
    assert items[1].prompt == "q2" and items[1].id.endswith("g.json:2")
    result = evaluate_detector(items, lambda it: len(it.response) % 7)
    labels = [i.hallucinated for i in items]
    scores = [len(i.response) % 7 for i in items]
    assert result.auc_pr == pytest.approx(average_precision_score(labels, scores))
    assert result.auc_roc == pytest.approx(roc_auc_score(labels, scores))
    assert result.positive_rate == 0.5 and result.n == 4


def test_paired_layouts_give_two_items(tmp_path):
    qa = {"knowledge": "k", "question": "q", "right_answer": "r", "hallucinated_answer": "h"}
    summ = [{"document": "d", "right_summary": "r", "hallucinated_summary": "h"}]
    items = load_halueval(_write(tmp_path / "qa.json", [qa]))
    assert [(i.prompt, i.response, i.hallucinated) for i in items] == [("k\nq", "r", False), ("k\nq", "h", True)]
    (tmp_path / "s.json").write_text(json.dumps(summ))
    assert [i.response for i in load_halueval(tmp_path / "s.json")] == ["r", "h"]


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", r"b.json:3: expected a JSON object, got invalid JSON"),
        ('{"user_query": "q"}', r"b.json:3: expected HaluEval fields"),
        ('{"user_query": "q", "chatgpt_response": "r", "hallucination": "maybe"}', r"b.json:3: .*'yes' or 'no'"),
        ("[1]", r"b.json:3: expected a JSON object, got list"),
    ],
)
def test_malformed_rows_are_named_by_line(tmp_path, bad, message):
    path = _write(tmp_path / "b.json", [GENERAL[0], "", bad])
    with pytest.raises(DataError, match=message):
        load_halueval(path)


def test_failed_items_are_recorded_not_fatal():
    items = [DetectionItem(str(i), "p", "r" * i, i % 2 == 1) for i in range(6)]

    def score(item):
        if item.id == "3":
            raise DataError("empty text")
        return float(len(item.response))

    result = evaluate_detector(items, score)
    assert result.failed == {"3": "empty text"} and result.n == 5
    assert result.auc_roc == pytest.approx(roc_auc_score([i % 2 for i in (0, 1, 2, 4, 5)], [0, 1, 2, 4, 5]))
    with pytest.raises(DataError, match="both hallucinated and correct"):
        evaluate_detector(items[:1], score)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no file"):
        load_halueval(tmp_path / "none.json")
