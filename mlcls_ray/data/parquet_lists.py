"""The sparse list format beside PaddleX's text lists: ``train.parquet`` and ``val.parquet``, one row per image.

Columns: ``path`` (string, relative to the dataset folder, as in the text lists) and ``labels`` (a list of int32
class ids into ``label.txt``, in any order; an empty list is an image with no label). At 20,000 classes a text line
spells 40 KB of 0/1 and 10M images make 400 GB of lists; a row here holds its few ids. A dataset folder may hold
either form of a split's list, never both: which one is current cannot be guessed.

Lists are read a record batch at a time and checked in bulk; the few rows with a problem (an empty or unsafe path,
a null label list, an id outside ``label.txt``, an id twice) are named by file and 1-based row number and left out.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mlcls_ray import storage
from mlcls_ray.data import mlcls_format  # the text lists' path rules (a module import: they import this one too)
from mlcls_ray.data.problems import Problem, ProblemSink

__all__ = ["PARQUET_SUFFIX", "list_file", "list_suffix", "max_class_id", "read_parquet_list", "set_aside_other_form",
           "write_parquet_list"]

PARQUET_SUFFIX = ".parquet"
_BATCH_ROWS = 1 << 18  # rows checked at a time: bounds the per-batch arrays whatever the row group size
_ROW_GROUP = 1 << 20  # rows per row group when writing


def list_file(root: str, split: str, problems: ProblemSink) -> str | None:
    """The file that holds a split's list, ``<split>.txt`` or ``<split>.parquet``; None (with a problem) when both
    exist. A split with neither gets ``<split>.txt``, whose absence the reader reports as today."""
    text, table = f"{split}.txt", f"{split}{PARQUET_SUFFIX}"
    if not storage.exists(storage.join(root, table)):
        return text
    if storage.exists(storage.join(root, text)):
        problems.append(Problem("ambiguous_list", table, None,
                                f"both {text} and {table} are in {root}; keep the one that is current and move the "
                                "other away (mlcls does not guess)"))
        return None
    return table


def list_suffix(list_format: str) -> str:
    """``.parquet`` for ``parquet``, ``.txt`` for PaddleX's text lists."""
    return PARQUET_SUFFIX if list_format == "parquet" else ".txt"


def set_aside_other_form(folder: str, suffix: str, splits: tuple[str, ...] = ("train", "val")) -> None:
    """After lists with ``suffix`` were written to ``folder``, move each split's list in the other form to its
    numbered ``.bak``, so the folder never holds both forms of a split and nothing is deleted."""
    other = ".txt" if suffix == PARQUET_SUFFIX else PARQUET_SUFFIX
    for split in splits:
        storage.backup(storage.join(folder, split + other))


def _schema_problem(schema: pa.Schema) -> str | None:
    fields = {f.name: f.type for f in schema}
    if "path" not in fields or "labels" not in fields:
        return f"needs columns 'path' (string) and 'labels' (list of int32 class ids); it has {sorted(fields)}"
    if not (pa.types.is_string(fields["path"]) or pa.types.is_large_string(fields["path"])):
        return f"column 'path' must be a string, not {fields['path']}"
    labels = fields["labels"]
    if not (pa.types.is_list(labels) or pa.types.is_large_list(labels)) or not pa.types.is_integer(labels.value_type):
        return f"column 'labels' must be a list of integer class ids, not {labels}"
    return None


def _check_paths(paths: pa.Array, bad: np.ndarray, file: str, first_row: int, problems: ProblemSink
                 ) -> pa.Array:
    """Normalised paths; rows with an empty or unsafe path are flagged in ``bad`` (and recorded)."""
    empty = pc.fill_null(pc.equal(pc.utf8_length(paths), 0), True).to_numpy(zero_copy_only=False)
    odd = pc.fill_null(pc.match_substring_regex(paths, mlcls_format.ODD_PATH), False).to_numpy(zero_copy_only=False)
    if not (empty.any() or odd.any()):
        return paths
    values = paths.to_pylist()
    for i in np.flatnonzero(empty | odd):
        row, path = first_row + int(i), values[i]
        if empty[i]:
            problems.append(Problem("bad_line", file, row, "empty path"))
        elif reason := mlcls_format.unsafe_reason(path):
            problems.append(Problem("unsafe_path", file, row, reason, path))
        else:
            values[i] = posixpath.normpath(path.strip(" \t\r\f\v"))
            continue
        bad[i] = True
    return pa.array(values, pa.string())


def _check_ids(labels: pa.Array, num_classes: int, bad: np.ndarray, file: str, first_row: int, paths: pa.Array,
               problems: ProblemSink) -> tuple[np.ndarray, np.ndarray]:
    """``(lengths [n] int64, ids [nnz] int64)`` with each row's ids sorted; rows with a null list, a null or
    out-of-range id, or an id twice are flagged in ``bad`` (and recorded)."""
    n = len(labels)
    lengths = pc.fill_null(pc.list_value_length(labels), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=starts[1:])
    null_list = labels.is_null().to_numpy(zero_copy_only=False)
    values = pc.list_flatten(labels)
    row_of = np.repeat(np.arange(n), lengths)  # [nnz] the row of each id; sorting within rows keeps it
    null_id = values.is_null().to_numpy(zero_copy_only=False)
    ids = pc.fill_null(values, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    if not ((ids[1:] > ids[:-1]) | (row_of[1:] != row_of[:-1])).all():  # lists written sorted (ours) skip the sort
        order = np.lexsort((ids, row_of))
        ids, null_id = ids[order], null_id[order]
    outside = ((ids < 0) | (ids >= num_classes)) & ~null_id
    twice = np.zeros(len(ids), bool)
    twice[1:] = (ids[1:] == ids[:-1]) & (row_of[1:] == row_of[:-1]) & ~null_id[1:]
    flagged = null_list.copy()
    flagged[row_of[null_id | outside | twice]] = True
    flagged &= ~bad  # a row with a bad path has its problem already
    if flagged.any():
        for i, path in zip(np.flatnonzero(flagged), paths.take(pa.array(np.flatnonzero(flagged))).to_pylist()):
            mine = slice(starts[i], starts[i + 1])
            if null_list[i]:
                kind, reason = "no_label_field", "labels is null (write [] for an image with no label)"
            elif null_id[mine].any():
                kind, reason = "bad_value", "labels holds a null class id"
            elif outside[mine].any():
                kind, reason = "bad_value", (f"class id {int(ids[mine][outside[mine]][0])} is outside label.txt's "
                                             f"0..{num_classes - 1}")
            else:
                kind, reason = "bad_value", f"class id {int(ids[mine][twice[mine]][0])} appears twice"
            problems.append(Problem(kind, file, first_row + int(i), reason, path))
        bad |= flagged
    return lengths, ids


def read_parquet_list(uri: str, file: str, num_classes: int, problems: ProblemSink
                      ) -> Iterator[tuple[pa.Array, np.ndarray, np.ndarray, np.ndarray]]:
    """The good rows of a Parquet list, a batch at a time: ``(paths, row numbers [n] uint32 (1-based),
    offsets [n + 1] int64, ids [nnz] int32)``, each row's ids sorted. A file that is not a readable Parquet list
    is one problem and yields nothing.

    Raises:
        StorageError: the file cannot be opened.
    """
    try:
        reader = pq.ParquetFile(storage.open_input(uri, seekable=True))
    except (pa.ArrowInvalid, OSError) as exc:
        if isinstance(exc, storage.StorageError):
            raise
        problems.append(Problem("unreadable_file", file, None, f"not a Parquet file ({exc})"))
        return
    schema_problem = _schema_problem(reader.schema_arrow)
    if schema_problem:
        problems.append(Problem("unreadable_file", file, None, schema_problem))
        return
    first_row = 1
    try:
        for batch in reader.iter_batches(batch_size=_BATCH_ROWS, columns=["path", "labels"]):
            n = batch.num_rows
            bad = np.zeros(n, bool)
            paths = _check_paths(batch.column("path").cast(pa.string()), bad, file, first_row, problems)
            lengths, ids = _check_ids(batch.column("labels"), num_classes, bad, file, first_row, paths, problems)
            keep = ~bad
            kept_ids = ids[np.repeat(keep, lengths)]
            offsets = np.zeros(int(keep.sum()) + 1, np.int64)
            np.cumsum(lengths[keep], out=offsets[1:])
            rows = (first_row + np.flatnonzero(keep)).astype(np.uint32)
            yield (paths.filter(pa.array(keep)) if bad.any() else paths), rows, offsets, kept_ids.astype(np.int32)
            first_row += n
    except (pa.ArrowInvalid, OSError) as exc:
        problems.append(Problem("unreadable_file", file, first_row, f"cannot read on from this row ({exc})"))


def max_class_id(uri: str) -> int:
    """The largest class id in a Parquet list (-1 when none can be read): sizes the labels without a label.txt."""
    try:
        labels = pq.ParquetFile(storage.open_input(uri, seekable=True)).read(columns=["labels"]).column("labels")
        largest = pc.max(pc.list_flatten(labels)).as_py()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, KeyError, OSError):
        return -1
    return -1 if largest is None else int(largest)


def write_parquet_list(uri: str, paths: pa.Array | pa.ChunkedArray, offsets: np.ndarray, ids: np.ndarray) -> None:
    """Write a Parquet list: ``paths [n]`` and each row's ids ``ids[offsets[i]:offsets[i + 1]]``."""
    list_type = pa.ListArray if offsets[-1] < 2**31 else pa.LargeListArray
    labels = list_type.from_arrays(pa.array(offsets.astype(np.int32 if list_type is pa.ListArray else np.int64)),
                                   pa.array(ids.astype(np.int32, copy=False)))
    table = pa.table({"path": pa.chunked_array([paths]) if isinstance(paths, pa.Array) else paths,
                      "labels": labels})
    with storage.open_output(uri) as f:
        pq.write_table(table, f, row_group_size=_ROW_GROUP, compression="zstd")
