"""The confident-learning rules against a case computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from mlcls_ray.audit.confident import ClassTally, flag_pairs, pair_quality

# class 0: labelled 1, 1, 1, 0, 0, 0; class 1: labelled 0 everywhere (no positive: it cannot be audited)
LABELS = np.array([[1, 0], [1, 0], [1, 0], [0, 0], [0, 0], [0, 0]], np.uint8)
SCORES = np.array([[0.9, 0.9], [0.8, 0.1], [0.1, 0.1], [0.2, 0.1], [0.1, 0.1], [0.85, 0.95]], np.float32)


def _thresholds():
    tally = ClassTally.zeros(2)
    tally.add(SCORES[:4], LABELS[:4])  # two batches sum as one
    tally.add(SCORES[4:], LABELS[4:])
    return tally.thresholds()


def test_thresholds_are_the_self_confidences_of_each_class():
    t = _thresholds()
    assert t.positive[0] == pytest.approx((0.9 + 0.8 + 0.1) / 3)  # 0.6
    assert t.negative[0] == pytest.approx((0.2 + 0.1 + 0.85) / 3)  # 0.3833
    assert np.isnan(t.positive[1]) and list(t.audited) == [True, False]


def test_a_confident_contradiction_is_flagged_each_way_and_nothing_else():
    rows, classes, z, joint = flag_pairs(SCORES, LABELS, _thresholds())
    assert list(zip(rows, classes)) == [(2, 0), (5, 0)]  # image 2 likely wrong, image 5 likely missing
    # how atypical each score is in its label group: positives 0.9, 0.8, 0.1 (mean 0.6, std 0.3559), negatives
    # 0.2, 0.1, 0.85 (mean 0.3833, std 0.3325)
    assert z == pytest.approx([(0.6 - 0.1) / 0.35590, (0.85 - 0.38333) / 0.33250], abs=1e-3)  # 1.405, 1.404
    # [given][confident]: given 0 -> images 3, 4 confidently 0 and image 5 confidently 1; given 1 -> image 2
    # confidently 0, images 0 and 1 confidently 1; class 1 is not audited, so image 5's 0.95 counts nowhere
    assert joint[:, :, 0].tolist() == [[2, 1], [1, 2]] and joint[:, :, 1].tolist() == [[0, 0], [0, 0]]


def test_pair_quality_is_one_on_the_agreeing_side_and_the_normal_tail_beyond():
    quality = pair_quality(np.array([-3.0, 0.0, 1.0, 2.0], np.float32))
    assert quality.tolist() == pytest.approx([1, 1, 0.3173, 0.0455], abs=1e-4)
