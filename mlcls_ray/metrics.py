"""Multi-label metrics in pure numpy: per-class AP and mAP, F1-best per-class thresholds, precision / recall / F1.

Each function works on ``[N, C]`` scores and multi-hot labels a block at a time (a few classes when it sorts, a few
rows when it counts), so memory stays near 64 MB a block whatever N and C are; no Python loop runs per class or per
row. Classes without a positive label are left out of every class average, as PaddleClas does.

A class's AP, threshold and counts depend on its own column alone: blocks of classes scored by different
processes concatenate into exactly the single-process result, and :func:`class_mean` and
:func:`prf_from_counts` turn the concatenation into the averages.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np

__all__ = ["average_precision", "calibrate_thresholds", "class_mean", "cross_fitted_counts", "cross_fitted_f1",
           "mean_average_precision", "precision_recall_f1", "prf_counts", "prf_from_counts"]

_BLOCK_BYTES = 64 << 20  # target size of one [classes, N] int64 block, or of one [rows, C] bool block


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores, labels = np.asarray(scores), np.asarray(labels)
    if scores.ndim != 2 or scores.shape != labels.shape:
        raise ValueError(f"scores and labels must both be [N, C], got {scores.shape} and {labels.shape}")
    return scores, labels


def _rank(scores: np.ndarray, labels: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort k classes of ``[N, k]`` scores (N > 0) descending, one class a row.

    Returns:
        ``[k, N]`` sorted scores; ``[k, N]`` int64 true positives among the first n + 1 rows; ``[k, N]`` bool, whether
        row n ends a group of tied scores (the next score differs). A class being a row, its sort and sums run over
        contiguous memory and do not depend on k.
    """
    s = np.array(scores.T, dtype=dtype, order="C")
    order = np.argsort(s, axis=1)[:, ::-1]
    s = np.take_along_axis(s, order, axis=1)
    tp = (np.take_along_axis(labels.T, order, axis=1) != 0).astype(np.int64)
    np.cumsum(tp, axis=1, out=tp)
    end = np.ones(s.shape, bool)
    np.not_equal(s[:, :-1], s[:, 1:], out=end[:, :-1])
    return s, tp, end


def _by_class_block(fn: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray], scores: np.ndarray,
                    labels: np.ndarray, out: np.ndarray, chunk_classes: int | None, dtype: np.dtype) -> np.ndarray:
    """Fill ``out[cols]`` with ``fn(*_rank(...))`` for each block of classes; each block is freed before the next."""
    n, c = scores.shape
    chunk = chunk_classes or max(1, _BLOCK_BYTES // (8 * n))
    for start in range(0, c, chunk):
        cols = slice(start, start + chunk)
        out[cols] = fn(*_rank(scores[:, cols], labels[:, cols], dtype))
    return out


def _ap_block(s: np.ndarray, tp: np.ndarray, end: np.ndarray) -> np.ndarray:
    rank = np.arange(1, s.shape[1] + 1)  # rows predicted positive at the threshold of row n
    group = np.zeros_like(tp)
    np.multiply(tp[:, :-1], end[:, :-1], out=group[:, 1:])
    np.maximum.accumulate(group, axis=1, out=group)  # true positives at the previous group end
    np.subtract(tp, group, out=group)  # at a group end: the positives in that group
    precision = tp / rank
    precision *= group
    gain = precision.sum(axis=1, where=end)  # sum over thresholds of positives gained times precision
    positives = tp[:, -1]
    return np.divide(gain, positives, out=np.full(len(positives), np.nan), where=positives > 0)


def average_precision(scores: np.ndarray, labels: np.ndarray, chunk_classes: int | None = None) -> np.ndarray:
    """Per-class average precision, as sklearn's ``average_precision_score`` computes it for each class.

    AP = sum over distinct score thresholds of (R_n - R_{n-1}) * P_n; tied scores make one threshold.

    Args:
        scores: ``[N, C]`` float logits or probabilities, used in their own float dtype (others become float64).
        labels: ``[N, C]`` multi-hot, uint8 or bool.
        chunk_classes: classes sorted at a time; by default as many as keep a ``[k, N]`` int64 block near 64 MB.

    Returns:
        ``[C]`` float64 AP; NaN for a class without positives.
    """
    scores, labels = _check(scores, labels)
    ap = np.full(scores.shape[1], np.nan)
    if len(scores) == 0:
        return ap
    dtype = scores.dtype if scores.dtype.kind == "f" else np.dtype(np.float64)
    return _by_class_block(_ap_block, scores, labels, ap, chunk_classes, dtype)


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean of :func:`average_precision` over the classes with at least one positive.

    Classes without positives are excluded, as PaddleClas does; NaN when no class has a positive.
    """
    return class_mean(average_precision(scores, labels))


def class_mean(values: np.ndarray) -> float:
    """Mean of per-class values (``[C]``, NaN for a class without positives) over the classes that have one; NaN
    when none has. The mAP of per-class APs computed a block of classes at a time, on any number of processes."""
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else float("nan")


def _threshold_block(s: np.ndarray, tp: np.ndarray, end: np.ndarray, default: float) -> np.ndarray:
    n = s.shape[1]
    positives = tp[:, -1]
    f1 = tp / (np.arange(1, n + 1) + positives[:, None])  # half the F1 of keeping the first n + 1 rows
    f1[~end] = -1.0
    best = np.argmax(f1, axis=1)  # the first best: the highest threshold among equal F1s
    row = np.arange(len(best))
    kept, below = s[row, best], s[row, np.minimum(best + 1, n - 1)]
    mid = ((kept.astype(np.float64) + below) / 2).astype(np.float32)
    mid = np.where(mid < kept, mid, below)  # adjacent floats: the midpoint rounds onto the kept score
    t = np.where(best == n - 1, np.nextafter(kept, np.float32(-np.inf)), mid)
    return np.where(positives > 0, t, np.float32(default))


def calibrate_thresholds(probs: np.ndarray, labels: np.ndarray, default: float = 0.5) -> np.ndarray:
    """Per-class thresholds that maximise F1 for the rule ``probs > t`` (strictly greater, as PaddleX 3.x).

    The best set keeps every row scoring at least some score s (the highest such s among equal F1s); t is the
    midpoint between s and the next lower distinct score, or, when every row is kept, the next float32 below the
    smallest score (which is >= 0 whenever that score is > 0). Scores are compared in float32.

    Args:
        probs: ``[N, C]`` scores, compared as float32.
        labels: ``[N, C]`` multi-hot, uint8 or bool.
        default: the threshold of a class without positives.

    Returns:
        ``[C]`` float32 thresholds.
    """
    probs, labels = _check(probs, labels)
    out = np.full(probs.shape[1], default, np.float32)
    if len(probs) == 0:
        return out
    return _by_class_block(partial(_threshold_block, default=default), probs, labels, out, None,
                           np.dtype(np.float32))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` as float64, with 0 where ``den`` is 0."""
    return np.divide(num, den, out=np.zeros(np.shape(num)), where=np.asarray(den) > 0)


def prf_counts(probs: np.ndarray, labels: np.ndarray, thresholds: float | np.ndarray,
               chunk_rows: int | None = None) -> np.ndarray:
    """Per-class counts of the predictions ``probs > thresholds``, which add up over rows (and concatenate over
    classes) exactly, so row or class blocks can be counted apart and combined.

    Args:
        probs: ``[N, C]`` scores.
        labels: ``[N, C]`` multi-hot, uint8 or bool.
        thresholds: one threshold, or ``[C]`` per class.
        chunk_rows: rows compared at a time; by default as many as keep a ``[rows, C]`` bool block near 64 MB.

    Returns:
        ``[3, C]`` int64: true positives, predicted positives and positives of each class.
    """
    probs, labels = _check(probs, labels)
    n, c = probs.shape
    step = chunk_rows or max(1, _BLOCK_BYTES // max(c, 1))
    counts = np.zeros((3, c), np.int64)
    tp, predicted, positives = counts
    for start in range(0, n, step):
        pred = probs[start:start + step] > thresholds
        y = labels[start:start + step] != 0
        predicted += pred.sum(axis=0)
        positives += y.sum(axis=0)
        tp += np.logical_and(pred, y, out=pred).sum(axis=0)
    return counts


def prf_from_counts(counts: np.ndarray) -> dict[str, float]:
    """Micro and macro precision, recall and F1 from :func:`prf_counts` ``[3, C]``.

    Macro averages are over the classes with at least one positive (NaN when there is none), as for
    :func:`mean_average_precision`; a ratio 0 / 0 counts as 0.

    Returns:
        ``micro_precision``, ``micro_recall``, ``micro_f1``, ``macro_precision``, ``macro_recall``, ``macro_f1``.
    """
    tp, predicted, positives = counts
    seen = positives > 0
    macro = (_ratio(tp, predicted)[seen], _ratio(tp, positives)[seen], _ratio(2 * tp, predicted + positives)[seen])
    macro_p, macro_r, macro_f1 = (float(m.mean()) if seen.any() else float("nan") for m in macro)
    tp_all, predicted_all, positives_all = tp.sum(), predicted.sum(), positives.sum()
    return {
        "micro_precision": float(_ratio(tp_all, predicted_all)),
        "micro_recall": float(_ratio(tp_all, positives_all)),
        "micro_f1": float(_ratio(2 * tp_all, predicted_all + positives_all)),
        "macro_precision": macro_p,
        "macro_recall": macro_r,
        "macro_f1": macro_f1,
    }


def precision_recall_f1(probs: np.ndarray, labels: np.ndarray, thresholds: float | np.ndarray,
                        chunk_rows: int | None = None) -> dict[str, float]:
    """Micro and macro precision, recall and F1 of the predictions ``probs > thresholds``: :func:`prf_from_counts`
    of :func:`prf_counts` (see both for the arguments and the averages)."""
    return prf_from_counts(prf_counts(probs, labels, thresholds, chunk_rows))


def cross_fitted_counts(probs: np.ndarray, labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """:func:`prf_counts` ``[3, C]`` at calibrated thresholds, honestly: the rows are split in two halves at random,
    and each half is scored at the thresholds calibrated on the other. Thresholds scored on the rows they were
    calibrated on report an optimistic F1, most of all for rare classes. The halves depend only on N and the seed,
    so blocks of classes of the same rows, in the same order, combine exactly."""
    probs, labels = _check(probs, labels)
    first = np.random.default_rng(seed).permutation(len(probs)) < (len(probs) + 1) // 2
    counts = np.zeros((3, probs.shape[1]), np.int64)
    for part in (first, ~first):
        counts += prf_counts(probs[part], labels[part], calibrate_thresholds(probs[~part], labels[~part]))
    return counts


def cross_fitted_f1(probs: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, float]:
    """:func:`prf_from_counts` of :func:`cross_fitted_counts`."""
    return prf_from_counts(cross_fitted_counts(probs, labels, seed))
