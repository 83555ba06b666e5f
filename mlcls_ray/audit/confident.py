"""Confident learning for multi-label sets: per-class thresholds from out-of-fold scores, and the (image, class)
pairs whose given label a confident score contradicts.

Each class is its own binary problem (Northcutt et al., 2021, per class as cleanlab's multi-label filter). Its two
thresholds are its self-confidences: ``threshold_positive``, the mean out-of-fold score of the images labelled 1,
and ``threshold_negative``, the mean score of those labelled 0. A score at or above the first is a confident 1, at
or below the second a confident 0:

- *missing*: given 0, confidently 1;
- *wrong*: given 1, confidently 0.

How far a pair disagrees is measured on the class's own scale, ``x = (score - t_neg) / (t_pos - t_neg)`` (0 at a
typical negative, 1 at a typical positive): ``disagreement = x`` for a given 0 and ``1 - x`` for a given 1, so a
pair is flagged exactly when its disagreement reaches 1, whatever the class's score range. ``pair_quality =
1 / (1 + max(disagreement, 0)^2)`` maps it to (0, 1]: 1 agrees, 0.5 is the flagging line. An image's quality is its
worst pair's. A class whose positives do not score above its negatives on average (``t_pos <= t_neg``, or no
positives) tells nothing about its labels and is not audited.

The per-class noise rates come from the confident joint: among the confidently-scored images labelled 0, the share
that are confidently 1 (an estimate of the class's missing rate), and among those labelled 1, the share that are
confidently 0 (its wrong rate). Everything is accumulated batch by batch: memory is one batch and a few ``[C]``
arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ClassTally", "Thresholds", "flag_pairs", "pair_quality"]


@dataclass
class ClassTally:
    """Per-class sums over every scored image: the first pass."""

    positives: np.ndarray  # [C] int64 images labelled 1
    negatives: np.ndarray  # [C] int64 images labelled 0
    positive_scores: np.ndarray  # [C] float64 sum of their scores
    negative_scores: np.ndarray  # [C] float64

    @classmethod
    def zeros(cls, num_classes: int) -> ClassTally:
        return cls(*(np.zeros(num_classes, t) for t in (np.int64, np.int64, np.float64, np.float64)))

    def add(self, scores: np.ndarray, labels: np.ndarray) -> None:
        """Count one batch: ``scores`` ``[B, C]`` probabilities, ``labels`` ``[B, C]`` 0/1."""
        given = labels.astype(bool)
        positives = given.sum(axis=0)
        self.positives += positives
        self.negatives += len(given) - positives
        on_positives = np.where(given, scores, 0).sum(axis=0, dtype=np.float64)
        self.positive_scores += on_positives
        self.negative_scores += scores.sum(axis=0, dtype=np.float64) - on_positives

    def thresholds(self) -> Thresholds:
        with np.errstate(invalid="ignore", divide="ignore"):
            positive = (self.positive_scores / self.positives).astype(np.float32)
            negative = (self.negative_scores / self.negatives).astype(np.float32)
        return Thresholds(positive, negative)


@dataclass
class Thresholds:
    """Each class's self-confidence thresholds (NaN where it has no image labelled 1, or none labelled 0)."""

    positive: np.ndarray  # [C] float32
    negative: np.ndarray  # [C] float32

    @property
    def audited(self) -> np.ndarray:
        """``[C]`` bool: the classes whose positives score above their negatives on average."""
        with np.errstate(invalid="ignore"):
            return self.positive > self.negative

    def disagreement(self, scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """``[B, C]`` float32: how far each given label is from its score, in units of the class's span; a pair is an
        issue from 1 up. Classes not audited get -inf."""
        audited = self.audited
        span = np.where(audited, self.positive - self.negative, 1).astype(np.float32)
        x = (scores - np.where(audited, self.negative, 0)) / span  # [B, C]; 0 a typical negative, 1 a positive
        d = np.where(labels.astype(bool), 1 - x, x)
        return np.where(audited, d, -np.inf).astype(np.float32)


def pair_quality(disagreement: np.ndarray) -> np.ndarray:
    """(0, 1]: 1 where the label agrees, 0.5 on the flagging line, toward 0 the surer the contradiction."""
    d = np.maximum(disagreement, 0)
    return (1 / (1 + d * d)).astype(np.float32)


def flag_pairs(scores: np.ndarray, labels: np.ndarray, thresholds: Thresholds
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The issues of one batch, and its part of the confident joint.

    Returns:
        ``rows`` and ``classes`` (int64) of the flagged pairs, their ``disagreement`` (float32), and the confident
        joint ``[2, 2, C]`` int64: ``[given, confident]`` counts per class (pairs confident neither way are not
        counted).
    """
    given = labels.astype(bool)
    d = thresholds.disagreement(scores, labels)
    rows, classes = np.nonzero(d >= 1)
    with np.errstate(invalid="ignore"):
        sure_1 = (scores >= thresholds.positive) & thresholds.audited
        sure_0 = (scores <= thresholds.negative) & thresholds.audited
    joint = np.stack([np.stack([(~given & sure_0).sum(0), (~given & sure_1).sum(0)]),
                      np.stack([(given & sure_0).sum(0), (given & sure_1).sum(0)])]).astype(np.int64)
    return rows.astype(np.int64), classes.astype(np.int64), d[rows, classes], joint
