"""Per-frame AP / mAP against scikit-learn, calibrated AP against its definition, on random and real labels."""

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from notelab.core.errors import ShapeError
from notelab.eval.detection import (
    average_precision,
    calibrated_average_precision,
    drop_ambiguous_softmax,
    drop_column,
    frame_map,
    future_step_map,
)

THUMOS = Path(__file__).resolve().parents[3] / "shared" / "data" / "oadtr" / "anno_thumos.zip"


def cap_by_definition(scores, positive):
    """De Geest et al. 2016: mean over positives of w TP / (w TP + FP) at each positive's rank, w = #neg / #pos."""
    order = np.argsort(-scores)
    y = positive[order]
    w = (~positive).sum() / positive.sum()
    total, tp = 0.0, 0
    for k in np.flatnonzero(y):
        tp += 1
        fp = k + 1 - tp
        total += w * tp / (w * tp + fp)
    return total / positive.sum()


def test_ap_equals_sklearn_with_and_without_ties():
    rng = np.random.default_rng(0)
    for ties in (False, True):
        for _ in range(5):
            s = rng.random(300)
            if ties:
                s = np.round(s * 6) / 6  # many tied scores: thresholds group them
            y = rng.random(300) < 0.2
            assert average_precision(s, y) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_calibrated_ap_equals_its_definition_and_is_prior_free():
    rng = np.random.default_rng(1)
    s, y = rng.random(500), rng.random(500) < 0.1
    assert calibrated_average_precision(s, y) == pytest.approx(cap_by_definition(s, y), abs=1e-12)
    # with w = 1 (as many negatives as positives) cAP is AP
    y2 = np.arange(400) % 2 == 0
    s2 = rng.random(400)
    assert calibrated_average_precision(s2, y2) == pytest.approx(average_precision(s2, y2), abs=1e-12)
    # a perfect ranking scores 1, whatever the prior
    assert calibrated_average_precision(y.astype(float) + 0.01 * s, y) == pytest.approx(1.0)


def test_frame_map_skips_background_and_classes_without_positives():
    rng = np.random.default_rng(2)
    labels = np.eye(4)[rng.integers(0, 3, 200)]  # class 3 never occurs
    scores = rng.random((200, 4))
    out = frame_map(scores, labels)
    assert set(out.ap) == {1, 2} and out.no_positives == [3]
    assert out.mAP == pytest.approx(np.mean([average_precision_score(labels[:, c], scores[:, c]) for c in (1, 2)]))
    with pytest.raises(ShapeError, match="one shape"):
        frame_map(scores, labels[:, :3])
    with pytest.raises(ShapeError, match="finite"):
        average_precision(np.array([0.1, np.nan]), np.array([1, 0]))


def test_future_steps_and_ambiguous_softmax():
    rng = np.random.default_rng(3)
    s, y = rng.random((50, 3, 4)), np.eye(4)[rng.integers(0, 4, (50, 3))]
    maps = future_step_map(s, y)
    assert len(maps) == 3 and maps[1] == pytest.approx(frame_map(s[:, 1], y[:, 1]).mAP)
    logits = torch.randn(5, 6)
    p = drop_ambiguous_softmax(logits, 5)
    assert p.shape == (5, 5) and torch.allclose(p.sum(-1), torch.ones(5))
    assert torch.allclose(p, torch.softmax(logits[:, :5], -1))
    assert drop_column(np.eye(6), 5).shape == (6, 5)


@pytest.mark.skipif(not THUMOS.is_file(), reason=f"real THUMOS'14 annotations not found at {THUMOS}")
def test_parity_on_real_thumos_test_annotations():
    from notelab.data.streams import thumos_annotations

    anno = thumos_annotations(THUMOS, "test")
    assert len(anno) == 213
    labels = np.concatenate(list(anno.values()))  # (frames, 22): background, 20 actions, ambiguous
    keep = labels[:, 21] != 1  # the official protocol scores no ambiguous frame
    labels = drop_column(labels[keep], 21)
    rng = np.random.default_rng(0)
    scores = rng.random(labels.shape)
    out = frame_map(scores, labels)
    assert sorted(out.ap) == list(range(1, 21)) and not out.no_positives
    for c in range(1, 21):
        assert out.ap[c] == pytest.approx(average_precision_score(labels[:, c], scores[:, c]), abs=1e-10)
    for c in (1, 7, 20):  # the definition's Python loop is slow; three classes
        assert out.cap[c] == pytest.approx(cap_by_definition(scores[:, c], labels[:, c] == 1), abs=1e-10)
