"""The hallucination claim's decision rules, and one end-to-end run on tiny settings (fake TruthfulQA and
HaluEval files, so those parts run without the real data)."""

import dataclasses
import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from notelab.reproduce import hallucination as claim
from notelab.reproduce import rules


def test_random_auc_pr_by_hand_and_by_simulation():
    assert claim.random_auc_pr(5, 5) == 1.0  # every item positive
    assert claim.random_auc_pr(4, 1) == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)  # E[1 / rank]
    assert claim.random_auc_pr(2, 1) == pytest.approx(0.75)
    rng = np.random.default_rng(0)
    ranked = rng.permuted(np.tile([1] * 3 + [0] * 7, (40000, 1)), axis=1)  # labels in a random rank order
    hits = ranked.cumsum(1)
    ap = (ranked * hits / np.arange(1, 11)).sum(1) / 3  # precision at each positive's rank, averaged
    scores = np.arange(10, 0, -1)  # the same ranking as scores: the definition sklearn computes
    assert ap[:5] == pytest.approx([average_precision_score(r, scores) for r in ranked[:5]])
    assert claim.random_auc_pr(10, 3) == pytest.approx(ap.mean(), abs=0.004)
    assert claim.random_auc_pr(10, 3) > 0.3 + 0.05  # well above the positive rate on a fold of 10
    assert claim.random_auc_pr(100_000, 30_000) == pytest.approx(0.3, abs=1e-3)


def test_fold_gaps_subtract_the_random_ranking():
    labels = [True, False] * 4
    assert claim.fold_gaps(labels, [1.0, 0.0] * 4, 2) == []  # each fold holds one class only
    labels = [True, True, False, False] * 3
    scores = [0.9, 0.8, 0.1, 0.2] * 3
    # each fold: 2 of 4 positive, ranked first -> AUC-PR 1, against E[AP](4, 2) = (H_4 + (4 - H_4) / 3) / 4
    h4 = 1 + 1 / 2 + 1 / 3 + 1 / 4
    assert claim.fold_gaps(labels, scores, 3) == pytest.approx([1 - (h4 + (4 - h4) / 3) / 4] * 3)
    nan = float("nan")
    assert claim.fold_gaps([True, False, True], [nan, 0.1, 0.2], 1) == pytest.approx([1 - 0.75])


def test_only_the_primary_detector_decides():
    checks = claim.detection_checks({claim.PRIMARY: [0.1, 0.12, 0.09, 0.11], "b": [-0.2, -0.21, -0.19]})
    roles = {c.name.split(":")[0]: (c.role, c.verdict) for c in checks}
    assert roles == {claim.PRIMARY: ("decides", "holds"), "b": ("reported", "does not hold")}
    assert rules.group_verdicts(checks)[claim.DETECT] == "holds"
    worse = claim.detection_checks({claim.PRIMARY: [-0.1, -0.12, -0.09], "b": [0.3, 0.31, 0.29]})
    assert rules.group_verdicts(worse)[claim.DETECT] == "does not hold"
    assert claim.detection_checks({claim.PRIMARY: [0.2]})[0].verdict == "inconclusive"


def test_pr_vs_random_leaves_out_unscored_items():
    nan = float("nan")
    n, pr, rate, roc = claim.pr_vs_random([True, False, True, False], [0.9, 0.1, nan, 0.2])
    assert (n, pr, rate, roc) == (3, 1.0, pytest.approx(1 / 3), 1.0)
    assert claim.pr_vs_random([True, True], [0.1, 0.2]) is None


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
    detect = next(t for t in result.tables if t.title.startswith("(2)"))
    assert detect.columns[-2:] == ["AUC-PR / random within params", "AUC-PR / random within default"]
    rates = result.tables[0].rows
    assert rates[-1][0] == "all" and rates[-1][1] == 10
