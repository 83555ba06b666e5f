"""Evaluate's metrics a block of classes at a time: joined, they are the figures of the whole score matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlcls_ray.metrics import average_precision, cross_fitted_f1, precision_recall_f1
from mlcls_ray.train.evaluate import combine_blocks, score_block


@pytest.mark.parametrize("width", [1, 4, 11])
def test_class_blocks_join_into_the_figures_of_the_whole_matrix(width):
    """Blocks of 1, 4 and all 11 classes (with ties, a class without positives and one rare class) give the
    figures the metrics give on the whole [N, C] matrix, to the last bit: a block put at the wrong classes, or rows
    in another order (the cross-fitted halves), changes them."""
    rng = np.random.default_rng(0)
    labels = (rng.random((301, 11)) < 0.25).astype(np.uint8)
    labels[:, 2], labels[:, 7] = 0, 0
    labels[5, 7] = 1
    logits = np.round(4 * (2 * labels + rng.standard_normal(labels.shape))).astype(np.float32) / 4
    thresholds = rng.uniform(0.3, 0.7, 11).astype(np.float32)
    names = [f"class {c}" for c in range(11)]
    bounds = [*range(0, 11, width), 11]
    blocks = [score_block(np.ascontiguousarray(logits[:, lo:hi]), labels[:, lo:hi], thresholds[lo:hi])
              for lo, hi in zip(bounds[:-1], bounds[1:])]
    metrics, plot = combine_blocks(blocks, names)

    ap = average_precision(logits, labels)
    probs = torch.from_numpy(logits).sigmoid().numpy()
    assert metrics["MultiLabelMAP"] == float(np.nanmean(ap))
    assert metrics["per_class_AP"] == {n: None if np.isnan(a) else round(float(a), 6) for n, a in zip(names, ap)}
    assert metrics["classes_without_positives"] == ["class 2"]
    assert metrics["at_threshold_0.5"] == precision_recall_f1(probs, labels, 0.5)
    assert metrics["at_calibrated_thresholds_in_sample"] == precision_recall_f1(probs, labels, thresholds)
    assert metrics["at_thresholds_calibrated_on_the_other_half"] == cross_fitted_f1(probs, labels)
    frequent = np.argsort(-labels.sum(axis=0, dtype=np.int64), kind="stable")[:10]
    assert list(plot["curves"]) == list(frequent)  # the 10 most frequent classes are drawn, whatever the blocks
    assert plot["histograms"].sum() == labels.size
