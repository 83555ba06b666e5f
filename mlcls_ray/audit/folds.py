"""Stratified folds of a whole dataset (train + val pooled) for out-of-fold scoring."""

from __future__ import annotations

import numpy as np

from mlcls_ray.data.manifest import Manifest
from mlcls_ray.data.split import iterative_stratification

__all__ = ["assign_folds", "fold_sizes"]


def fold_sizes(n: int, folds: int) -> tuple[int, ...]:
    """As even as can be: the first ``n % folds`` folds get one sample more."""
    return tuple(n // folds + (f < n % folds) for f in range(folds))


def assign_folds(manifest: Manifest, folds: int, seed: int, order: np.ndarray | None = None) -> np.ndarray:
    """``[N]`` int8 fold of each row, by iterative stratification (each class spread evenly over the folds).

    The folds depend only on the set of paths and labels and the seed, not on the lists' order, so a rerun (or a
    resumed audit) puts every image in the fold it had. ``order`` is the manifest's
    :meth:`~Manifest.path_order`, when the caller has it already.
    """
    if len(manifest) < folds:
        raise ValueError(f"Audit.folds={folds} needs at least {folds} images; the dataset lists {len(manifest)}")
    order = manifest.path_order() if order is None else order
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return iterative_stratification(*manifest.label_ids(), manifest.num_classes, fold_sizes(len(manifest), folds),
                                    seed, rank)
