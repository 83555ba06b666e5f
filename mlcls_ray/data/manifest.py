"""The parsed dataset as columns: paths, list file and line, and the labels as bits or as sets. No object per image.

A manifest costs the path bytes (about 20-30 per image), 4 bytes of path offset, 4 of line number, 1 of list file
and its labels, in whichever of two forms is smaller:

- bit-packed, C/8 bytes a row: 38 bytes an image at 80 classes with 19-byte paths, about 4-5 GB for 100M;
- sets (:mod:`mlcls_ray.data.labels`' CSR: 8 bytes of offset a row, 2 a label): at 11,166 classes and 9 labels an
  image, 26 bytes a row instead of 1,396.

Both answer the same methods (dense chunks, class counts, labels per image, select, the ids of rows), so no caller
forks on the form. Statistics, duplicate detection and the split work on these arrays, chunk by chunk, without a
dense or float copy of the whole label matrix.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mlcls_ray.data.labels import csr_dense, csr_pack, csr_take, ids_dtype, packed_counts, packed_to_csr

__all__ = ["Manifest"]

_CHUNK_BYTES = 32 << 20  # dense label rows unpacked at a time
Part = tuple[int, pa.Array, np.ndarray, np.ndarray]  # (file index, paths, line numbers, packed labels)


@dataclass(frozen=True)
class Manifest:
    """Rows of a dataset, in list order (every row of ``files[0]`` first, each list in line order).

    Build one with :meth:`concat` (bit-packed parts, as the text lists parse) or :meth:`from_csr` (class ids); both
    keep whichever label form is smaller.

    Attributes:
        files: the list files the rows come from, e.g. ``("train.txt", "val.txt")``.
        num_classes: the label vector length C.
        paths: ``[N]`` image paths relative to the dataset root, normalised.
        file: ``[N]`` uint8 index into ``files``.
        line: ``[N]`` uint32 1-based line (or row) number in that file.
        packed: ``[N, ceil(C / 8)]`` uint8, the multi-hot labels as ``np.packbits(labels, axis=1)``; None when the
            labels are held as sets.
        offsets: ``[N + 1]`` int64, where each row's ids begin in ``ids``; None when packed.
        ids: ``[nnz]`` uint16 (uint32 when C > 65,536), each row's class ids, sorted; None when packed.
    """

    files: tuple[str, ...]
    num_classes: int
    paths: pa.ChunkedArray
    file: np.ndarray
    line: np.ndarray
    packed: np.ndarray | None = None
    offsets: np.ndarray | None = None
    ids: np.ndarray | None = None

    @classmethod
    def empty(cls, files: Sequence[str], num_classes: int) -> Manifest:
        return cls(tuple(files), num_classes, pa.chunked_array([], pa.string()), np.zeros(0, np.uint8),
                   np.zeros(0, np.uint32), np.zeros((0, (num_classes + 7) // 8), np.uint8))

    @classmethod
    def concat(cls, files: Sequence[str], num_classes: int, parts: Sequence[Part]) -> Manifest:
        """Build from parsed pieces ``(file index, paths, line numbers, packed labels)``, in order."""
        if not parts:
            return cls.empty(files, num_classes)
        manifest = cls(
            tuple(files), num_classes,
            pa.chunked_array([p for _, p, _, _ in parts], pa.string()),
            np.concatenate([np.full(len(lines), f, np.uint8) for f, _, lines, _ in parts]),
            np.concatenate([lines for _, _, lines, _ in parts]).astype(np.uint32, copy=False),
            np.concatenate([packed for _, _, _, packed in parts]),
        )
        nnz = sum(int(packed_counts(packed).sum()) for _, _, _, packed in parts)
        if _sparse_bytes(len(manifest), nnz, num_classes) >= manifest.packed.nbytes:
            return manifest
        offsets, ids = packed_to_csr(manifest.packed, num_classes)
        return manifest._with_labels(None, offsets, ids)

    @classmethod
    def from_csr(cls, files: Sequence[str], num_classes: int, paths: pa.Array | pa.ChunkedArray,
                 file: np.ndarray, line: np.ndarray, offsets: np.ndarray, ids: np.ndarray) -> Manifest:
        """Build from class ids, CSR style: row ``i`` has the sorted, distinct ids ``ids[offsets[i]:offsets[i + 1]]``
        (all below ``num_classes``: the reader has checked them).

        Args:
            files: the list files, as in :attr:`files`.
            num_classes: C.
            paths: ``[N]`` normalised relative image paths.
            file: ``[N]`` index into ``files`` of each row.
            line: ``[N]`` 1-based row number of each row in its file.
            offsets: ``[N + 1]`` where each row's ids begin, from 0.
            ids: ``[nnz]`` class ids.
        """
        paths = paths if isinstance(paths, pa.ChunkedArray) else pa.chunked_array([paths], pa.string())
        offsets = np.asarray(offsets, np.int64)
        ids = np.asarray(ids).astype(ids_dtype(num_classes), copy=False)
        if len(offsets) != len(paths) + 1 or offsets[0] != 0 or offsets[-1] != len(ids):
            raise ValueError(f"CSR labels do not match the {len(paths):,} paths: {len(offsets):,} offsets from "
                             f"{offsets[0] if len(offsets) else None} to {offsets[-1] if len(offsets) else None}, "
                             f"{len(ids):,} ids")
        manifest = cls(tuple(files), num_classes, paths, np.asarray(file, np.uint8),
                       np.asarray(line, np.uint32), None, offsets, ids)
        if _sparse_bytes(len(paths), len(ids), num_classes) < len(paths) * ((num_classes + 7) // 8):
            return manifest
        return manifest._with_labels(csr_pack(offsets, ids, num_classes), None, None)

    def _with_labels(self, packed: np.ndarray | None, offsets: np.ndarray | None, ids: np.ndarray | None
                     ) -> Manifest:
        return Manifest(self.files, self.num_classes, self.paths, self.file, self.line, packed, offsets, ids)

    def __len__(self) -> int:
        return len(self.file)

    @property
    def sparse(self) -> bool:
        """Whether the labels are held as sets (CSR) rather than bits."""
        return self.packed is None

    @property
    def nbytes(self) -> int:
        labels = self.packed.nbytes if self.packed is not None else self.offsets.nbytes + self.ids.nbytes
        return self.paths.nbytes + self.file.nbytes + self.line.nbytes + labels

    def rows_of(self, file: str) -> np.ndarray:
        """``[N]`` bool: the rows that come from one list file."""
        if file not in self.files:
            return np.zeros(len(self), bool)
        return self.file == self.files.index(file)

    def labels(self, rows: slice | np.ndarray) -> np.ndarray:
        """Dense ``[n, C]`` uint8 labels of some rows (a slice, an index array or a bool mask)."""
        if not self.sparse:
            return np.unpackbits(self.packed[rows], axis=1, count=self.num_classes)
        return csr_dense(*self.label_ids(rows), self.num_classes)

    def label_ids(self, rows: slice | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """CSR ``(offsets [n + 1] int64, ids [nnz])`` of every row or some rows: each row's sorted class ids."""
        if not self.sparse:
            return packed_to_csr(self.packed if rows is None else self.packed[rows], self.num_classes)
        if rows is None:
            return self.offsets, self.ids
        if isinstance(rows, slice):
            start, stop, step = rows.indices(len(self))
            if step == 1:
                offsets = self.offsets[start:max(start, stop) + 1]
                return offsets - offsets[0], self.ids[offsets[0]:offsets[-1]]
            rows = np.arange(start, stop, step)
        return csr_take(self.offsets, self.ids, np.flatnonzero(rows) if rows.dtype == bool else rows)

    def chunk_rows(self) -> int:
        """How many rows to unpack at a time so a dense chunk stays near 32 MB (and its column sums exact in
        float32: at most 2^20 rows)."""
        return min(1 << 20, max(1, _CHUNK_BYTES // max(self.num_classes, 1)))

    def iter_labels(self, rows: np.ndarray | None = None) -> Iterator[np.ndarray]:
        """Dense ``[n, C]`` uint8 labels, chunk by chunk, of every row or of the rows a bool mask selects."""
        step = self.chunk_rows()
        for start in range(0, len(self), step):
            chunk = slice(start, start + step) if rows is None else start + np.flatnonzero(rows[start:start + step])
            yield self.labels(chunk)

    def class_counts(self, rows: np.ndarray | None = None) -> np.ndarray:
        """``[C]`` int64 positives per class, of every row or of the rows a bool mask selects."""
        counts = np.zeros(self.num_classes, np.int64)
        if not self.sparse:
            for y in self.iter_labels(rows):
                counts += y.sum(axis=0, dtype=np.int64)
            return counts
        step = 1 << 20
        for start in range(0, len(self), step):
            ids = self.ids[self.offsets[start]:self.offsets[min(start + step, len(self))]]
            if rows is not None:
                ids = ids[np.repeat(rows[start:start + step], np.diff(self.offsets[start:start + step + 1]))]
            counts += np.bincount(ids, minlength=self.num_classes)
        return counts

    def labels_per_image(self) -> np.ndarray:
        """``[N]`` number of positive labels of each row: uint16, uint32 when C > 65,535."""
        dtype = np.uint16 if self.num_classes < 1 << 16 else np.uint32
        if self.sparse:
            return np.diff(self.offsets).astype(dtype)
        out = np.empty(len(self), dtype)
        step = self.chunk_rows()
        for start in range(0, len(self), step):
            out[start:start + step] = packed_counts(self.packed[start:start + step])
        return out

    def select(self, rows: np.ndarray) -> Manifest:
        """The manifest of the rows a bool mask or an index array selects, in their order."""
        indices = np.flatnonzero(rows) if rows.dtype == bool else rows
        picked = Manifest(self.files, self.num_classes, self.paths.take(pa.array(indices)), self.file[indices],
                          self.line[indices])
        if not self.sparse:
            return picked._with_labels(self.packed[indices], None, None)
        return picked._with_labels(None, *csr_take(self.offsets, self.ids, indices))

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
        """Arrow tables of ``index`` (row number), ``path`` and ``label_ids`` (list<int32>: each row's sorted class
        ids), for Ray Data."""
        blocks = []
        for start in range(0, len(self), rows_per_block):
            n = min(rows_per_block, len(self) - start)
            offsets, ids = self.label_ids(slice(start, start + n))
            blocks.append(pa.table({
                "index": pa.array(np.arange(start, start + n, dtype=np.int64)),
                "path": self.paths.slice(start, n).combine_chunks(),
                "label_ids": pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                                      pa.array(ids.astype(np.int32))),
            }))
        return blocks


def _sparse_bytes(rows: int, nnz: int, num_classes: int) -> int:
    """What a CSR form of the labels costs: an int64 offset a row, an id a label."""
    return 8 * (rows + 1) + nnz * ids_dtype(num_classes).itemsize
