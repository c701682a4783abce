import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from notelab.core.errors import DataError
from notelab.eval.ranking import auc_pr, auc_roc


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [None, 3, 7])  # None: continuous scores; an int: that many tied values
def test_parity_with_sklearn(seed, levels):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 200))
    y = rng.integers(0, 2, n)
    y[0], y[1] = 0, 1  # both classes
    s = rng.normal(size=n) + 0.8 * y
    if levels is not None:
        s = np.round(s * levels / 4) / levels  # many ties, across classes
    assert auc_pr(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert auc_roc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_known_values():
    # a perfect ranking, a reversed one, and all scores tied (AUC-ROC 1/2, AUC-PR the positive rate)
    y = [0, 0, 1, 1, 1]
    assert auc_pr(y, [0, 1, 2, 3, 4]) == 1.0 and auc_roc(y, [0, 1, 2, 3, 4]) == 1.0
    assert auc_roc(y, [4, 3, 2, 1, 0]) == 0.0
    assert auc_roc(y, [1] * 5) == 0.5 and auc_pr(y, [1] * 5) == pytest.approx(3 / 5)
    # one negative tied with the best positive: that pair counts 1/2
    assert auc_roc([1, 0, 1], [0.9, 0.9, 0.1]) == pytest.approx((0.5 + 0.0) / 2)
    assert auc_pr([True, False], [0.2, 0.1]) == 1.0  # booleans are labels too


@pytest.mark.parametrize(
    "labels, scores, words",
    [
        ([1, 1, 1], [0.1, 0.2, 0.3], "all positive"),
        ([0, 0], [0.1, 0.2], "all negative"),
        ([], [], "none"),
        ([0, 1], [0.1], "one length"),
        ([0, 2], [0.1, 0.2], "labels 0/1"),
        ([0, 1], [0.1, float("nan")], "finite"),
    ],
)
def test_bad_input_is_one_clear_line(labels, scores, words):
    for metric in (auc_pr, auc_roc):
        with pytest.raises(DataError, match=words) as e:
            metric(labels, scores)
        assert metric.__name__ in str(e.value) and "\n" not in str(e.value)
