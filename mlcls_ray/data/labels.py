"""Labels as sets: each row's sorted class ids, and the conversions to and from dense and bit-packed matrices.

A set of rows is held CSR style: ``offsets`` ``[n + 1]`` int64 and ``ids`` ``[nnz]`` (uint16 when C <= 65,536,
else uint32), row ``i`` having ``ids[offsets[i]:offsets[i + 1]]``. A dense ``[n, C]`` matrix is only ever built for a
batch or a bounded chunk of rows. Every helper works chunk by chunk, so no temporary grows with the whole set.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["csr_dense", "csr_pack", "csr_take", "dense", "ids_dtype", "packed_counts", "packed_to_csr",
           "rows_by_class"]

_ROWS = 1 << 20  # rows gathered or indexed at a time: bounds every temporary to a few tens of MB
_DENSE_BYTES = 32 << 20  # dense label rows built at a time
_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1).astype(np.uint8)


def ids_dtype(num_classes: int) -> np.dtype:
    """The smallest unsigned type that holds every class id."""
    return np.dtype(np.uint16 if num_classes <= 1 << 16 else np.uint32)


def dense(label_ids: Sequence[np.ndarray] | np.ndarray, num_classes: int, dtype: np.dtype = np.uint8
          ) -> np.ndarray:
    """``[n, C]`` multi-hot labels of a batch whose rows carry their class ids (the ``label_ids`` column of a
    stream batch: an object array of int arrays, or an ``[n, k]`` int array when every row has ``k`` ids)."""
    lengths = np.fromiter((len(row) for row in label_ids), np.int64, count=len(label_ids))
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.concatenate([np.asarray(row) for row in label_ids]) if offsets[-1] else np.zeros(0, np.int64)
    return csr_dense(offsets, ids, num_classes, dtype)


def csr_dense(offsets: np.ndarray, ids: np.ndarray, num_classes: int, dtype: np.dtype = np.uint8) -> np.ndarray:
    """``[n, C]`` multi-hot labels of CSR rows."""
    n = len(offsets) - 1
    out = np.zeros((n, num_classes), dtype)
    rows = np.repeat(np.arange(n), np.diff(offsets))
    out[rows, ids[offsets[0]:offsets[-1]]] = 1
    return out


def csr_take(offsets: np.ndarray, ids: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The CSR ``(offsets, ids)`` of some rows, in the order of the index array ``rows``."""
    rows = np.asarray(rows, np.int64)
    starts = offsets[rows]
    new = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(offsets[rows + 1] - starts, out=new[1:])
    out = np.empty(int(new[-1]), ids.dtype)
    for a in range(0, len(rows), _ROWS):
        b = min(a + _ROWS, len(rows))
        lo, hi = int(new[a]), int(new[b])
        out[lo:hi] = ids[np.repeat(starts[a:b] - new[a:b], np.diff(new[a:b + 1])) + np.arange(lo, hi)]
    return new, out


def packed_counts(packed: np.ndarray) -> np.ndarray:
    """``[n]`` int64 labels of each bit-packed row (a popcount of its bytes)."""
    return _POPCOUNT[packed].sum(axis=1, dtype=np.int64)


def packed_to_csr(packed: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR ``(offsets, ids)`` of bit-packed labels (``np.packbits(y, axis=1)``); ids come out sorted per row."""
    offsets = np.zeros(len(packed) + 1, np.int64)
    step = max(1, _DENSE_BYTES // max(num_classes, 1))
    for a in range(0, len(packed), step):
        offsets[a + 1:a + step + 1] = packed_counts(packed[a:a + step])
    np.cumsum(offsets, out=offsets)
    ids = np.empty(int(offsets[-1]), ids_dtype(num_classes))
    for a in range(0, len(packed), step):
        _, cols = np.nonzero(np.unpackbits(packed[a:a + step], axis=1, count=num_classes))  # row-major: sorted
        ids[offsets[a]:offsets[min(a + step, len(packed))]] = cols
    return offsets, ids


def csr_pack(offsets: np.ndarray, ids: np.ndarray, num_classes: int) -> np.ndarray:
    """``[n, ceil(C / 8)]`` bit-packed labels of CSR rows."""
    n = len(offsets) - 1
    out = np.empty((n, (num_classes + 7) // 8), np.uint8)
    step = max(1, _DENSE_BYTES // max(num_classes, 1))
    for a in range(0, n, step):
        b = min(a + step, n)
        out[a:b] = np.packbits(csr_dense(offsets[a:b + 1], ids, num_classes), axis=1)
    return out


def rows_by_class(offsets: np.ndarray, ids: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The inverted index: ``(starts [C + 1] int64, rows)``, where ``rows[starts[c]:starts[c + 1]]`` are the rows
    that have class ``c``, ascending. Built a chunk of rows at a time (a stable counting placement), so the only
    array of the whole set's size is the answer (int32 rows when N < 2^31)."""
    n = len(offsets) - 1
    starts = np.zeros(num_classes + 1, np.int64)
    np.cumsum(np.bincount(ids, minlength=num_classes), out=starts[1:])
    rows = np.empty(len(ids), np.int32 if n < 1 << 31 else np.int64)
    cursor = starts[:-1].copy()
    for a in range(0, n, _ROWS):
        b = min(a + _ROWS, n)
        chunk = ids[offsets[a]:offsets[b]]
        order = np.argsort(chunk, kind="stable")  # by class; rows stay ascending within a class
        counts = np.bincount(chunk, minlength=num_classes)
        first = np.zeros(num_classes, np.int64)
        np.cumsum(counts[:-1], out=first[1:])  # where each class begins in the sorted chunk
        sorted_ids = chunk[order]
        owner = np.repeat(np.arange(a, b, dtype=rows.dtype), np.diff(offsets[a:b + 1]))
        rows[cursor[sorted_ids] + np.arange(len(chunk)) - first[sorted_ids]] = owner[order]
        cursor += counts
    return starts, rows
