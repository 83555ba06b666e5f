"""Manifest: labels held as bits or as class ids (CSR), whichever is smaller, answer every question the same way."""

import numpy as np
import pyarrow as pa
import pytest

from mlcls_ray.data.labels import dense
from mlcls_ray.data.manifest import Manifest
from mlcls_ray.data.split import iterative_stratification


def sparse_labels(n=2000, c=1000, seed=0):
    """Zipf-like rates, about 4 labels an image, some images with none."""
    rng = np.random.default_rng(seed)
    return (rng.random((n, c)) < 0.3 / np.arange(1, c + 1) ** 0.8).astype(np.uint8)


def both_forms(y):
    """The same rows as a bit-packed manifest and as an id (CSR) one."""
    n, c = y.shape
    paths, file, line = pa.array([f"images/{i}.jpg" for i in range(n)]), np.zeros(n, np.uint8), np.arange(1, n + 1)
    packed = Manifest(("train.txt",), c, pa.chunked_array([paths]), file, line.astype(np.uint32),
                      np.packbits(y, axis=1))
    rows, ids = np.nonzero(y)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])
    sparse = Manifest.from_csr(("train.txt",), c, paths, file, line, offsets, ids)
    return packed, sparse


def test_a_many_class_set_is_held_as_ids_at_a_fraction_of_the_bits():
    y = sparse_labels()
    packed, sparse = both_forms(y)
    assert sparse.sparse and not packed.sparse
    label_bytes = sparse.nbytes - sparse.paths.nbytes - sparse.file.nbytes - sparse.line.nbytes
    assert label_bytes == 8 * (len(y) + 1) + 2 * int(y.sum())  # int64 offsets, uint16 ids
    assert label_bytes < packed.packed.nbytes / 5
    # the text lists parse to bits; concat keeps ids when they are smaller
    parsed = Manifest.concat(("train.txt",), y.shape[1], [(0, packed.paths.chunk(0), packed.line, packed.packed)])
    assert parsed.sparse and parsed.nbytes == sparse.nbytes


def test_few_classes_keep_the_bits():
    y = sparse_labels(n=500, c=10)
    packed, from_ids = both_forms(y)
    assert not from_ids.sparse
    np.testing.assert_array_equal(from_ids.packed, packed.packed)


def test_both_forms_answer_every_question_the_same():
    y = sparse_labels()
    rng = np.random.default_rng(1)
    mask, order = rng.random(len(y)) < 0.3, rng.permutation(len(y))
    for m in both_forms(y):
        np.testing.assert_array_equal(m.class_counts(), y.sum(axis=0))
        np.testing.assert_array_equal(m.class_counts(mask), y[mask].sum(axis=0))
        np.testing.assert_array_equal(m.labels_per_image(), y.sum(axis=1))
        np.testing.assert_array_equal(m.labels(order[:50]), y[order[:50]])
        np.testing.assert_array_equal(m.labels(slice(10, 20)), y[10:20])
        np.testing.assert_array_equal(np.concatenate(list(m.iter_labels(mask))), y[mask])
        picked = m.select(order)
        assert picked.paths[0].as_py() == f"images/{order[0]}.jpg"
        np.testing.assert_array_equal(picked.labels(slice(None)), y[order])
        offsets, ids = m.label_ids(order[:3])
        assert [ids[offsets[i]:offsets[i + 1]].tolist() for i in range(3)] == [
            np.flatnonzero(y[r]).tolist() for r in order[:3]]
        blocks = m.to_blocks(300)  # what the stream carries: each row's sorted ids
        assert blocks[0].schema.field("label_ids").type == pa.list_(pa.int32())
        streamed = [dense(b.column("label_ids").to_numpy(zero_copy_only=False), y.shape[1]) for b in blocks]
        np.testing.assert_array_equal(np.concatenate(streamed), y)


def test_the_split_is_the_same_whichever_form_holds_the_labels():
    y = sparse_labels(n=3000)
    rank = np.random.default_rng(2).permutation(len(y))
    packed, sparse = both_forms(y)
    got = [iterative_stratification(*m.label_ids(), y.shape[1], (2400, 600), 7, rank) for m in (packed, sparse)]
    np.testing.assert_array_equal(got[0], got[1])
    assert (got[0] == 1).sum() == 600


def test_ids_that_do_not_match_the_paths_are_refused():
    with pytest.raises(ValueError, match="do not match the 3 paths"):
        Manifest.from_csr(("train.parquet",), 50, pa.array(["a", "b", "c"]), np.zeros(3, np.uint8), np.arange(1, 4),
                          np.array([0, 1, 2]), np.array([4, 5]))


def test_dense_takes_both_shapes_of_a_stream_batch():
    ragged = np.empty(3, object)
    ragged[:] = [np.array([0, 4], np.int32), np.array([], np.int32), np.array([2], np.int32)]
    np.testing.assert_array_equal(dense(ragged, 5), [[1, 0, 0, 0, 1], [0, 0, 0, 0, 0], [0, 0, 1, 0, 0]])
    even = np.array([[1, 3], [0, 2]], np.int32)  # Ray gives a 2-D array when every row has as many ids
    assert dense(even, 4, np.float32).tolist() == [[0, 1, 0, 1], [1, 0, 1, 0]]
    assert dense(np.zeros((2, 0), np.int32), 3).shape == (2, 3)
