"""Decision rules: intervals, verdicts (holds / does not hold / inconclusive), groups, pooling seeds."""

from __future__ import annotations

import math

import pytest

from notelab.reproduce import rules


@pytest.mark.parametrize(("df", "expected"), [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)])
def test_t_quantile_matches_the_t_table(df, expected):
    assert rules.t_quantile(0.975, df) == pytest.approx(expected, abs=2e-4)


def test_t_quantile_rejects_bad_arguments():
    with pytest.raises(ValueError, match="0.5 < p < 1"):
        rules.t_quantile(0.3, 3)


def test_mean_interval_is_mean_plus_minus_t_s_over_sqrt_n():
    iv = rules.mean_interval([1.0, 2.0, 3.0])
    half = 4.3027 * 1.0 / math.sqrt(3)
    assert iv.mean == 2.0 and iv.n == 3
    assert iv.low == pytest.approx(2.0 - half, abs=1e-3) and iv.high == pytest.approx(2.0 + half, abs=1e-3)
    one = rules.mean_interval([5.0])
    assert one.low == -math.inf and one.high == math.inf


def test_interval_verdicts_hold_fail_and_inconclusive():
    below = [0.010, 0.012, 0.011, 0.009]  # tight around +1%
    assert rules.check("g", "x", "r", below, 0.02, below=True).verdict == "holds"
    assert rules.check("g", "x", "r", below, 0.005, below=True).verdict == "does not hold"
    assert rules.check("g", "x", "r", [0.003, 0.029], 0.02, below=True).verdict == "inconclusive"
    assert rules.check("g", "x", "r", [0.001], 0.02, below=True).verdict == "inconclusive"  # one seed
    assert rules.check("g", "x", "r", below, 0.005, below=False).verdict == "holds"
    assert rules.check("g", "x", "r", [0.01, float("nan")], 0.0, below=False).verdict == "inconclusive"


def test_exact_checks_are_judged_on_the_value():
    assert rules.check("g", "x", "r", [0.0], 1e-6, below=True, exact=True).verdict == "holds"
    assert rules.check("g", "x", "r", [1.0], 1e-6, below=True, exact=True).verdict == "does not hold"


def test_groups_all_options_any_and_roles():
    h = rules.check("a", "h", "r", [1.0, 1.1, 0.9], 0.0, below=False)
    f = rules.check("a", "f", "r", [1.0, 1.1, 0.9], 0.0, below=True)
    assert h.verdict == "holds" and f.verdict == "does not hold"
    option = [dataclass_with(h, group="g", option="S=20"), dataclass_with(f, group="g", option="S=50")]
    assert rules.claim_verdict(option) == "holds"  # one option suffices
    both = [dataclass_with(h, group="g", option="S=20"), dataclass_with(f, group="g", option="S=20")]
    assert rules.claim_verdict(both) == "does not hold"  # all checks of an option must hold
    assert rules.claim_verdict([h, dataclass_with(f, group="b")]) == "does not hold"  # every group must hold
    soft = dataclass_with(f, group="b", role="cannot refute")
    assert soft.effective == "inconclusive" and rules.claim_verdict([h, soft]) == "inconclusive"
    shown = dataclass_with(f, group="b", role="reported")
    assert rules.claim_verdict([h, shown]) == "holds"  # reported checks are not counted
    assert rules.claim_verdict([]) == "inconclusive"
    with pytest.raises(ValueError, match="role"):
        dataclass_with(h, role="maybe")


def test_pool_judges_all_seeds_values_together():
    one = [rules.check("g", "gqa", "r", [0.003], 0.02, below=True)]
    two = [rules.check("g", "gqa", "r", [0.004], 0.02, below=True)]
    three = [rules.check("g", "gqa", "r", [0.005], 0.02, below=True)]
    assert one[0].verdict == "inconclusive"
    pooled = rules.pool([one, two, three])
    assert len(pooled) == 1 and pooled[0].values == [0.003, 0.004, 0.005] and pooled[0].verdict == "holds"


def test_interval_text_states_the_rule_and_interval():
    c = rules.check("g", "x", "r", [0.010, 0.012, 0.011], 0.02, below=True, scale=100, unit="%")
    text = c.interval_text()
    assert "95% CI" in text and "n=3" in text and "< +2%" in text


def test_paired_ratios():
    assert rules.paired_ratios([10.0, 20.0], [1.0, 4.0]) == [10.0, 5.0]
    with pytest.raises(ValueError):
        rules.paired_ratios([1.0], [1.0, 2.0])


def dataclass_with(c: rules.Check, **changes: object) -> rules.Check:
    import dataclasses

    return rules.judged(dataclasses.replace(c, **changes))
