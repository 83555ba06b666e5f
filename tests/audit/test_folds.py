"""Audit folds: a partition, stratified, independent of list order."""

from __future__ import annotations

import numpy as np
import pytest

from mlcls_ray.audit.folds import assign_folds, fold_sizes
from mlcls_ray.data.manifest import Manifest
import pyarrow as pa


def _manifest(labels: np.ndarray, paths: list[str]) -> Manifest:
    offsets = np.zeros(len(labels) + 1, np.int64)
    np.cumsum(labels.sum(1), out=offsets[1:])
    return Manifest.from_csr(("train.txt",), labels.shape[1], pa.array(paths), np.zeros(len(labels), np.uint8),
                             np.arange(1, len(labels) + 1, dtype=np.uint32), offsets,
                             np.nonzero(labels)[1].astype(np.int32))


def test_every_image_is_in_exactly_one_fold_and_each_class_is_spread_evenly():
    rng = np.random.default_rng(0)
    labels = (rng.random((503, 6)) < [0.5, 0.3, 0.1, 0.05, 0.02, 0.01]).astype(np.uint8)
    fold = assign_folds(_manifest(labels, [f"{i}.jpg" for i in range(503)]), 5, seed=3)
    assert sorted(np.bincount(fold).tolist()) == sorted(fold_sizes(503, 5)) == [100, 100, 101, 101, 101]
    per_fold = np.stack([labels[fold == f].sum(0) for f in range(5)])  # [5, C]
    spread = per_fold.max(0) - per_fold.min(0)
    assert (spread[2:] <= 1).all()  # the rare classes, placed first: even a class of 5 images has one in each fold
    assert (spread[:2] <= 0.15 * per_fold.mean(0)[:2]).all()  # the common ones, placed last, make up the sizes
    # fold f's model trains on the rows of the other folds: none of its own
    for f in range(5):
        assert not set(np.flatnonzero(fold == f)) & set(np.flatnonzero(fold != f))


def test_folds_depend_on_the_images_not_on_the_order_of_the_lists():
    rng = np.random.default_rng(1)
    labels = (rng.random((60, 3)) < 0.4).astype(np.uint8)
    paths = [f"img{i:02d}.jpg" for i in range(60)]
    perm = rng.permutation(60)
    a = assign_folds(_manifest(labels, paths), 3, seed=0)
    b = assign_folds(_manifest(labels[perm], [paths[i] for i in perm]), 3, seed=0)
    assert (a[perm] == b).all()


def test_more_folds_than_images_is_refused():
    with pytest.raises(ValueError, match="Audit.folds=5 needs at least 5 images"):
        assign_folds(_manifest(np.ones((3, 2), np.uint8), ["a", "b", "c"]), 5, seed=0)
