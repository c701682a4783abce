"""The oadtr claim runs end to end (tiny settings: every code path, seconds of compute)."""

from notelab.reproduce import CLAIMS
from notelab.reproduce.base import VERDICTS
from notelab.reproduce.oadtr import ABLATIONS, MAIN, _diffs, run


def test_claim_runs_end_to_end_tiny(tmp_path):
    assert CLAIMS["oadtr"] == "notelab.reproduce.oadtr"
    result = run(tmp_path, seed=0, tiny=True)
    assert result.name == "oadtr" and result.verdict in VERDICTS
    scores, horizon, speed = result.tables
    assert [r[0] for r in scores.rows] == [label for label, _, _ in MAIN + ABLATIONS]
    assert all(0.0 <= float(r[2]) <= 100.0 for r in scores.rows)
    assert [r[0] for r in horizon.rows] == ["OadTR", "TRN"] and len(horizon.columns) == 3  # Q = 2 steps
    assert all(float(r[1]) > 0 for r in speed.rows)
    for fig in result.figures:
        assert (tmp_path / fig.path).stat().st_size > 1000
    groups = {c.group for c in result.checks if c.role == "decides"}
    assert groups == {"OadTR beats TRN and RNNs", "task token and decoder help"}
    assert all(len(c.values) == 24 for c in result.checks)  # one paired difference per held-out video


def test_paired_differences_take_the_best_baseline():
    runs = {"A": [{"videos": [0.5, 0.2]}], "B": [{"videos": [0.1, 0.4]}], "C": [{"videos": [0.3, 0.1]}]}
    assert _diffs(runs, "A", ("B", "C")) == [0.5 - 0.3, 0.2 - 0.4]
