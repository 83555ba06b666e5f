"""Re-split train/val with iterative stratification (Sechidis et al., 2011), seeded and reproducible.

PaddleX shuffles the pooled lines without a seed and without stratification, so a rare class can land entirely in
train and every run gives another split. Here:

- each class's positive rate in val stays close to the whole set's ("no label" counts as one more class);
- the sizes are PaddleX's: train gets ``round(N * train_percent / 100)`` (Python's round, half to even);
- the partition depends only on the set of lines and the seed, never on their order in the files, so running the
  same split again gives byte-identical lists (and then nothing is rewritten);
- lines are copied verbatim, streamed, and both lists are replaced together (old or new, never a mix), the old
  ones kept as numbered ``.bak`` files;
- Parquet lists (``train.parquet``, ``val.parquet``) are split into Parquet lists, rows in the same order, each
  with its normalised path and sorted ids; a text list pooled with a Parquet one goes to Parquet too (and is set
  aside as ``.bak``): at 20,000 classes ids cannot become text lines of 0/1.

The stratification works on each image's class ids (CSR) and an index from each class to its rows, one label at a
time, in bulk: memory stays at a few bytes per label, with no dense or float copy of the matrix, whether the manifest
holds its labels as bits or as sets (the split is the same either way).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from mlcls_ray import storage
from mlcls_ray.data.labels import csr_take, rows_by_class
from mlcls_ray.data.mlcls_format import LABEL_FILE, SPLITS, copy_lines, drop_duplicates, read_dataset
from mlcls_ray.data.parquet_lists import PARQUET_SUFFIX, set_aside_other_form, write_parquet_list
from mlcls_ray.data.problems import Problem, ProblemLog, ProblemSink

__all__ = ["iterative_stratification", "split_dataset", "split_sizes"]


def split_sizes(n: int, train_percent: int) -> tuple[int, int]:
    """``(train, val)`` sizes as PaddleX computes them: ``round(n * train_percent / 100)``, the rest to val.

    Integer arithmetic with Python's rounding rule (half to even), so no float error moves a size.
    """
    quotient, remainder = divmod(n * train_percent, 100)
    train = quotient + (2 * remainder > 100 or (2 * remainder == 100 and quotient % 2 == 1))
    return train, n - train


def _allocate(count: int, desire: np.ndarray, room: np.ndarray) -> np.ndarray:
    """Share ``count`` samples between subsets in proportion to their desire for a label, largest remainders first,
    never giving a subset more than the ``room`` it has left: that keeps every subset's final size exact."""
    weights = np.maximum(desire, 0)
    share = count * weights / weights.sum() if weights.sum() > 0 else np.zeros_like(weights)
    alloc = np.minimum(np.floor(share).astype(np.int64), room)
    order = np.lexsort((-room, -(share - alloc)))  # the rest where it was wanted most, within the room left:
    for cap in (1, count):  # one more each first (largest remainders), then what room-capped subsets could not take
        for k in order:
            alloc[k] += min(count - alloc.sum(), room[k] - alloc[k], cap)
    return alloc


def _placed(offsets: np.ndarray, ids: np.ndarray, num_classes: int, empty: np.ndarray, rows: np.ndarray,
            subset: np.ndarray, k: int) -> np.ndarray:
    """``[K, C+1]`` int64 positives of each label, "no label" last, that some rows bring to their subsets."""
    taken, got = csr_take(offsets, ids, rows)
    counts = np.zeros((k, num_classes + 1), np.int64)
    counts[:, :-1] = np.bincount(np.repeat(subset, np.diff(taken)) * num_classes + got,
                                 minlength=k * num_classes).reshape(k, num_classes)
    counts[:, -1] = np.bincount(subset[empty[rows]], minlength=k)
    return counts


def iterative_stratification(offsets: np.ndarray, ids: np.ndarray, num_classes: int, sizes: tuple[int, ...],
                             seed: int, rank: np.ndarray | None = None) -> np.ndarray:
    """Assign each sample of a multi-label set to a subset of an exact size, spreading every label evenly.

    The label with the fewest unassigned samples goes first; its samples are shared between the subsets in
    proportion to how many of that label each still lacks, so rare labels are placed before common ones crowd them
    out, and common labels, placed last, make up for what the rare ones moved. No subset is ever given more samples
    than its size has room for, so the sizes come out exact.

    Args:
        offsets: ``[N + 1]`` CSR offsets of each sample's class ids (:meth:`Manifest.label_ids`).
        ids: ``[nnz]`` the class ids.
        num_classes: C.
        sizes: samples per subset, summing to N.
        seed: seeds the sample order and every tie-break.
        rank: ``[N]`` each sample's position in a canonical order (e.g. sorted by path), so the result depends only
            on the set of samples; default: row order.

    Returns:
        ``[N]`` int8 subset index per sample.
    """
    n = len(offsets) - 1
    rng = np.random.default_rng(seed)
    priority = rng.permutation(n)  # the seeded "shuffle", over canonical positions
    if rank is not None:
        priority = priority[rank]
    empty = np.diff(offsets) == 0
    starts, members = rows_by_class(offsets, ids, num_classes)  # each label's rows, ascending: no column unpacked
    totals = np.append(np.diff(starts), empty.sum())  # [C+1]
    k = len(sizes)
    ratios = np.asarray(sizes, np.float64) / max(n, 1)
    want_label = np.outer(ratios, totals)  # [K, C+1] positives each subset still lacks
    room = np.asarray(sizes, np.int64)  # [K] samples each subset still lacks
    remaining = totals.copy()
    assigned = np.full(n, -1, np.int8)
    while remaining.any():
        fewest = np.flatnonzero(remaining == remaining[remaining > 0].min())
        label = int(fewest[0] if len(fewest) == 1 else rng.choice(fewest))
        rows = np.flatnonzero(empty) if label == num_classes else members[starts[label]:starts[label + 1]]
        rows = rows[assigned[rows] < 0]
        rows = rows[np.argsort(priority[rows], kind="stable")]
        counts = _allocate(len(rows), want_label[:, label], room)  # [K] the first rows to subset 0, and so on
        subset = np.repeat(np.arange(k), counts)
        assigned[rows] = subset
        placed = _placed(offsets, ids, num_classes, empty, rows, subset, k)  # [K, C+1]
        want_label -= placed
        room -= counts
        remaining -= placed.sum(axis=0)
    return assigned


def split_dataset(root: str, train_percent: int, seed: int, problems: ProblemSink, out: str | None = None) -> bool:
    """Pool ``train.txt`` and ``val.txt`` (or their Parquet lists) and re-split them: ``train_percent`` to train,
    the rest to val.

    Args:
        root: the dataset whose lists are split.
        train_percent: train's share; val gets the rest.
        seed: the same lines and seed always give the same split.
        problems: where the reason goes when the lists cannot be split.
        out: where the split lists go (with a copy of ``label.txt``), in one replacement; default ``root``.

    Returns:
        Whether the lists were split; when not, the reason is a ``split_skipped`` problem and nothing is written.
        Lists that already hold exactly this split are left as they are.
    """
    with ProblemLog() as found:
        names, manifest = read_dataset(root, found)
        order = manifest.path_order()
        manifest = drop_duplicates(manifest, found, order)  # with a repeat the split stops below, order unused
        # pooling needs only one list with lines: a missing or empty train.txt or val.txt is what a split fixes
        blocking = {file: n for (file, kind), n in found.where.items()
                    if file == LABEL_FILE or kind not in ("missing_file", "empty_list")}
    if not len(manifest) and not blocking:
        problems.append(Problem("split_skipped", "train.txt", None, "train.txt and val.txt list no images to split"))
        return False
    if blocking or names is None:
        files = sorted(blocking)
        problems.append(Problem("split_skipped", files[0], None,
                                f"split skipped: fix the {sum(blocking.values())} problem(s) in {', '.join(files)} "
                                "first"))
        return False
    sizes = split_sizes(len(manifest), train_percent)
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))  # each row's place in path order: the split never sees the files' order
    del order
    parquet = any(f.endswith(PARQUET_SUFFIX) for f in manifest.files)
    files, file, line, num_classes = manifest.files, manifest.file, manifest.line, manifest.num_classes
    labels = manifest.label_ids()
    if not parquet:
        del manifest  # text lines are copied by number: their paths and bits need not be held while stratifying
    assigned = iterative_stratification(*labels, num_classes, sizes, seed, rank)
    del labels, rank
    out = out or root
    suffix = PARQUET_SUFFIX if parquet else ".txt"
    lists = [storage.join(out, f"{s}{suffix}") for s in SPLITS]
    label = [storage.join(out, LABEL_FILE)] if out != root else []
    with storage.replacing(lists + label) as staged:
        if label:
            storage.write_bytes(staged[label[0]], storage.read_bytes(storage.join(root, LABEL_FILE)))
        if parquet:
            for subset, target in enumerate(lists):
                rows = np.flatnonzero(assigned == subset)  # list order, as the text lines are copied
                write_parquet_list(staged[target], manifest.paths.take(pa.array(rows)), *manifest.label_ids(rows))
        else:
            with storage.open_output(staged[lists[0]]) as train, storage.open_output(staged[lists[1]]) as val:
                for index, name in enumerate(files):
                    rows = file == index
                    if rows.any():
                        copy_lines(storage.join(root, name), line[rows], assigned[rows], [train, val])
    if parquet:
        set_aside_other_form(out, suffix, SPLITS)
    return True
