"""The hallucination claim's decision rules, and one end-to-end run on tiny settings (fake TruthfulQA and
HaluEval files, so those parts run without the real data)."""

import dataclasses
import json

import pytest

from notelab.reproduce import hallucination as claim
from notelab.reproduce import rules


def test_fold_gaps_are_auc_pr_minus_positive_rate_per_fold():
    labels = [True, False, True, False, True, False, True, False]
    perfect = [1.0, 0.0] * 4
    # fold k holds items k, k + 2, ...: with 2 folds, fold 0 holds only positives -> no value
    assert claim.fold_gaps(labels, perfect, 2) == []
    gaps = claim.fold_gaps(labels, perfect, 4)  # items (0, 4), (1, 5): one class each -> none either
    assert gaps == []
    labels = [True, True, False, False] * 3
    scores = [0.9, 0.8, 0.1, 0.2] * 3
    gaps = claim.fold_gaps(labels, scores, 3)  # each fold: 2 positives ranked first -> AUC-PR 1, rate 1/2
    assert gaps == pytest.approx([0.5, 0.5, 0.5])
    nan = float("nan")
    assert claim.fold_gaps([True, False, True], [nan, 0.1, 0.2], 1) == pytest.approx([1 - 0.5])


def test_detection_group_holds_when_one_detector_beats_random():
    checks = claim.detection_checks({"a": [0.1, 0.12, 0.09, 0.11], "b": [-0.05, 0.04, 0.0, 0.01]})
    verdicts = {c.option: c.verdict for c in checks}
    assert verdicts == {"a": "holds", "b": "inconclusive"}
    assert rules.group_verdicts(checks)[claim.DETECT] == "holds"
    worse = claim.detection_checks({"b": [-0.1, -0.12, -0.09]})
    assert rules.group_verdicts(worse)[claim.DETECT] == "does not hold"


def test_paired_rate_check_is_per_fact():
    base = [1.0, 1.0, 0.5, 1.0, 0.75, 1.0]
    better = [0.5, 0.75, 0.25, 0.5, 0.5, 0.75]
    assert claim.paired_rate_check("g", "n", better, base).verdict == "holds"
    assert claim.paired_rate_check("g", "n", base, better).verdict == "does not hold"
    assert claim.paired_rate_check("g", "n", base, base).verdict == "inconclusive"


def test_tiny_run_end_to_end(tmp_path):
    root = tmp_path / "data"
    (root / "truthfulqa").mkdir(parents=True)
    (root / "truthfulqa" / "mc_task.json").write_text(
        json.dumps(
            [
                {"question": "What is 1+1?", "mc1_targets": {"2": 1, "3": 0}, "mc2_targets": {"2": 1, "3": 0}},
                {"question": "Sky?", "mc1_targets": {"blue": 1, "red": 0}, "mc2_targets": {"blue": 1, "red": 0}},
            ]
        )
    )
    (root / "halueval").mkdir()
    rows = [
        {
            "ID": str(i),
            "user_query": f"q {i}",
            "chatgpt_response": "x" * (5 + i),
            "hallucination": "yes" if i % 2 else "no",
        }
        for i in range(6)
    ]
    (root / "halueval" / "general_data.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = dataclasses.replace(
        claim.QUICK, corpus_chars=60_000, vocab_size=512, dim=32, n_layers=1, seq_len=64, steps=10, n_facts=10,
        n_samples=2, max_new_tokens=8, folds=2, truthfulqa_n=2, halueval_n=6,
    )  # fmt: skip
    result = claim.run(tmp_path / "out", quick=True, seed=0, settings=s, data_root=root)
    assert result.verdict in ("holds", "does not hold", "inconclusive")
    titles = [t.title for t in result.tables]
    assert any("TruthfulQA" in t for t in titles) and any("HaluEval" in t for t in titles)
    assert result.settings["facts"] == 10 and result.settings["truthfulqa"]
    groups = {c.group for c in result.checks}
    assert {claim.NUCLEUS, claim.RETRIEVAL} <= groups
    assert (tmp_path / "out" / "knowledge" / "stdlib_knowledge.jsonl").is_file()
    assert all((tmp_path / "out" / f.path).is_file() for f in result.figures)
    rates = result.tables[0].rows
    assert rates[-1][0] == "all" and rates[-1][1] == 10
