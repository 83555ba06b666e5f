"""Confident learning for multi-label sets: per-class thresholds from out-of-fold scores, and the (image, class)
pairs whose given label a confident score contradicts.

Each class is its own binary problem (Northcutt et al., 2021, per class as cleanlab's multi-label filter). Its two
thresholds are its self-confidences: ``threshold_positive``, the mean out-of-fold score of the images labelled 1,
and ``threshold_negative``, the mean score of those labelled 0. A score at or above the first is a confident 1, at
or below the second a confident 0:

- *missing*: given 0, confidently 1;
- *wrong*: given 1, confidently 0.

How sure an issue is, is how atypical its score is among the images given the same label for that class: ``z``,
its distance from that group's mean score toward the other label, in units of that group's standard deviation.
``pair_quality = erfc(max(z, 0) / sqrt(2))`` is the share of such a group (normal approximation) scoring at least
that far out: 1 for a score on the agreeing side of its group's mean, toward 0 the more atypical. Issues are ranked
by it, and an image's quality is its worst pair's. (Ranking by the distance on the span between the two
thresholds, or by cleanlab's self-confidence, put fewer planted flips in the top K: ``jobs/bench_audit.py``.) A
class whose positives do not score above its negatives on average (``t_pos <= t_neg``, or no positives) tells
nothing about its labels and is not audited.

The per-class noise rates come from the confident joint: among the confidently-scored images labelled 0, the share
that are confidently 1 (an estimate of the class's missing rate), and among those labelled 1, the share that are
confidently 0 (its wrong rate). Everything is accumulated batch by batch: memory is one batch and a few ``[C]``
arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ClassTally", "Thresholds", "flag_pairs", "pair_quality"]


@dataclass
class ClassTally:
    """Per-class sums over every scored image: the first pass."""

    positives: np.ndarray  # [C] int64 images labelled 1
    negatives: np.ndarray  # [C] int64 images labelled 0
    positive_scores: np.ndarray  # [C] float64 sum of their scores
    negative_scores: np.ndarray  # [C] float64
    positive_squares: np.ndarray  # [C] float64 sum of their squared scores
    negative_squares: np.ndarray  # [C] float64

    @classmethod
    def zeros(cls, num_classes: int) -> ClassTally:
        return cls(*(np.zeros(num_classes, t) for t in (np.int64, np.int64, *[np.float64] * 4)))

    def add(self, scores: np.ndarray, labels: np.ndarray) -> None:
        """Count one batch: ``scores`` ``[B, C]`` probabilities, ``labels`` ``[B, C]`` 0/1."""
        given = labels.astype(bool)
        positives = given.sum(axis=0)
        self.positives += positives
        self.negatives += len(given) - positives
        for group, total, squares in ((given, self.positive_scores, self.positive_squares),
                                      (~given, self.negative_scores, self.negative_squares)):
            mine = np.where(group, scores, 0).astype(np.float64)
            total += mine.sum(axis=0)
            squares += (mine * mine).sum(axis=0)

    def thresholds(self) -> Thresholds:
        with np.errstate(invalid="ignore", divide="ignore"):
            positive = self.positive_scores / self.positives
            negative = self.negative_scores / self.negatives
            spread = [np.sqrt(np.maximum(sq / n - mean * mean, 0)) for sq, n, mean in (
                (self.positive_squares, self.positives, positive), (self.negative_squares, self.negatives, negative))]
        return Thresholds(*(a.astype(np.float32) for a in (positive, negative, *spread)))


@dataclass
class Thresholds:
    """Each class's self-confidence thresholds (NaN where it has no image labelled 1, or none labelled 0)."""

    positive: np.ndarray  # [C] float32
    negative: np.ndarray  # [C] float32
    positive_std: np.ndarray  # [C] float32 the spread of the scores of the images labelled 1
    negative_std: np.ndarray  # [C] float32 ... labelled 0

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

    def atypicality(self, scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """``[B, C]`` float32 ``z``: each score's distance from the mean of the images given the same label, toward
        the other label, in that group's standard deviations."""
        given = labels.astype(bool)
        with np.errstate(invalid="ignore", divide="ignore"):
            z = np.where(given, (self.positive - scores) / self.positive_std,
                         (scores - self.negative) / self.negative_std)
        return np.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


def pair_quality(z: np.ndarray) -> np.ndarray:
    """(0, 1]: the share of the pair's label group scoring at least as atypically (normal approximation); 1 on
    the agreeing side of the group's mean."""
    return torch.special.erfc(torch.from_numpy(np.maximum(z, 0) / np.sqrt(2))).numpy().astype(np.float32)


def flag_pairs(scores: np.ndarray, labels: np.ndarray, thresholds: Thresholds
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The issues of one batch, and its part of the confident joint.

    Returns:
        ``rows`` and ``classes`` (int64) of the flagged pairs, their atypicality ``z`` (float32), and the confident
        joint ``[2, 2, C]`` int64: ``[given, confident]`` counts per class (pairs confident neither way are not
        counted).
    """
    given = labels.astype(bool)
    rows, classes = np.nonzero(thresholds.disagreement(scores, labels) >= 1)
    with np.errstate(invalid="ignore"):
        sure_1 = (scores >= thresholds.positive) & thresholds.audited
        sure_0 = (scores <= thresholds.negative) & thresholds.audited
    joint = np.stack([np.stack([(~given & sure_0).sum(0), (~given & sure_1).sum(0)]),
                      np.stack([(given & sure_0).sum(0), (given & sure_1).sum(0)])]).astype(np.int64)
    z = thresholds.atypicality(scores, labels)[rows, classes]
    return rows.astype(np.int64), classes.astype(np.int64), z, joint
