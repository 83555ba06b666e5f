"""The parsed dataset as columns: paths, list file and line, and a bit-packed label matrix. No object per image.

A manifest costs the path bytes (about 20-30 per image), 4 bytes of path offset, 4 of line number, 1 of list file
and C/8 of labels: 38 bytes an image at 80 classes with 19-byte paths, so about 4-5 GB on the driver for 100M.
Statistics, duplicate detection and the split all work on these arrays, chunk by chunk, without a dense or float
copy of the whole label matrix.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["Manifest"]

_CHUNK_BYTES = 32 << 20  # dense label rows unpacked at a time
Part = tuple[int, pa.Array, np.ndarray, np.ndarray]  # (file index, paths, line numbers, packed labels)


@dataclass(frozen=True)
class Manifest:
    """Rows of a dataset, in list order (every row of ``files[0]`` first, each list in line order).

    Attributes:
        files: the list files the rows come from, e.g. ``("train.txt", "val.txt")``.
        num_classes: the label vector length C.
        paths: ``[N]`` image paths relative to the dataset root, normalised.
        file: ``[N]`` uint8 index into ``files``.
        line: ``[N]`` uint32 1-based line number in that file.
        packed: ``[N, ceil(C / 8)]`` uint8, the multi-hot labels as ``np.packbits(labels, axis=1)``.
    """

    files: tuple[str, ...]
    num_classes: int
    paths: pa.ChunkedArray
    file: np.ndarray
    line: np.ndarray
    packed: np.ndarray

    @classmethod
    def empty(cls, files: Sequence[str], num_classes: int) -> Manifest:
        return cls(tuple(files), num_classes, pa.chunked_array([], pa.string()), np.zeros(0, np.uint8),
                   np.zeros(0, np.uint32), np.zeros((0, (num_classes + 7) // 8), np.uint8))

    @classmethod
    def concat(cls, files: Sequence[str], num_classes: int, parts: Sequence[Part]) -> Manifest:
        """Build from parsed pieces ``(file index, paths, line numbers, packed labels)``, in order."""
        if not parts:
            return cls.empty(files, num_classes)
        return cls(
            tuple(files), num_classes,
            pa.chunked_array([p for _, p, _, _ in parts], pa.string()),
            np.concatenate([np.full(len(lines), f, np.uint8) for f, _, lines, _ in parts]),
            np.concatenate([lines for _, _, lines, _ in parts]).astype(np.uint32, copy=False),
            np.concatenate([packed for _, _, _, packed in parts]),
        )

    def __len__(self) -> int:
        return len(self.file)

    @property
    def nbytes(self) -> int:
        return self.paths.nbytes + self.file.nbytes + self.line.nbytes + self.packed.nbytes

    def rows_of(self, file: str) -> np.ndarray:
        """``[N]`` bool: the rows that come from one list file."""
        if file not in self.files:
            return np.zeros(len(self), bool)
        return self.file == self.files.index(file)

    def labels(self, rows: slice | np.ndarray) -> np.ndarray:
        """Dense ``[n, C]`` uint8 labels of some rows."""
        return np.unpackbits(self.packed[rows], axis=1, count=self.num_classes)

    def chunk_rows(self) -> int:
        """How many rows to unpack at a time so a dense chunk stays near 32 MB (and its column sums exact in
        float32: at most 2^20 rows)."""
        return min(1 << 20, max(1, _CHUNK_BYTES // max(self.num_classes, 1)))

    def iter_labels(self, rows: np.ndarray | None = None) -> Iterator[np.ndarray]:
        """Dense ``[n, C]`` uint8 labels, chunk by chunk, of every row or of the rows a bool mask selects."""
        step = self.chunk_rows()
        for start in range(0, len(self), step):
            chunk = self.packed[start:start + step]
            if rows is not None:
                chunk = chunk[rows[start:start + step]]
            yield np.unpackbits(chunk, axis=1, count=self.num_classes)

    def class_counts(self, rows: np.ndarray | None = None) -> np.ndarray:
        """``[C]`` int64 positives per class."""
        counts = np.zeros(self.num_classes, np.int64)
        for y in self.iter_labels(rows):
            counts += y.sum(axis=0, dtype=np.int64)
        return counts

    def labels_per_image(self) -> np.ndarray:
        """``[N]`` uint16 number of positive labels of each row (a popcount of the packed bytes)."""
        popcount = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1).astype(np.uint16)
        out = np.empty(len(self), np.uint16)
        step = self.chunk_rows()
        for start in range(0, len(self), step):
            out[start:start + step] = popcount[self.packed[start:start + step]].sum(axis=1, dtype=np.uint16)
        return out

    def select(self, rows: np.ndarray) -> Manifest:
        """The manifest of the rows a bool mask or an index array selects, in their order."""
        indices = np.flatnonzero(rows) if rows.dtype == bool else rows
        return Manifest(self.files, self.num_classes, self.paths.take(pa.array(indices)), self.file[indices],
                        self.line[indices], self.packed[indices])

    def path_order(self) -> np.ndarray:
        """``[N]`` int64 row numbers sorted by path; the sort is stable, so equal paths keep their row order."""
        return pc.sort_indices(self.paths).to_numpy().astype(np.int64, copy=False)

    def first_occurrence(self, order: np.ndarray | None = None) -> np.ndarray:
        """``[N]`` int64: for each row, the first row with the same path (itself when it is the first).

        Args:
            order: :meth:`path_order`, when the caller has it already.
        """
        n = len(self)
        order = self.path_order() if order is None else order
        in_order = self.paths.take(pa.array(order))
        repeat = np.zeros(n, bool)  # [N] in path order: same path as the row before
        if n > 1:
            repeat[1:] = pc.equal(in_order.slice(1), in_order.slice(0, n - 1)).to_numpy()
        del in_order
        group_start = np.maximum.accumulate(np.where(repeat, 0, np.arange(n)))  # [N] where each run of a path begins
        first = np.empty(n, np.int64)
        first[order] = order[group_start]  # stable sort: a run begins with its smallest row number
        return first

    def to_blocks(self, rows_per_block: int) -> list[pa.Table]:
        """Arrow tables of ``index`` (row number), ``path`` and ``labels`` (the packed bytes), for Ray Data."""
        width = self.packed.shape[1]
        blocks = []
        for start in range(0, len(self), rows_per_block):
            n = min(rows_per_block, len(self) - start)
            packed = np.ascontiguousarray(self.packed[start:start + n])
            labels = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, pa.py_buffer(packed)])
            blocks.append(pa.table({
                "index": pa.array(np.arange(start, start + n, dtype=np.int64)),
                "path": self.paths.slice(start, n).combine_chunks(),
                "labels": labels,
            }))
        return blocks
