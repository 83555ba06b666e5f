"""Re-split train/val with iterative stratification (Sechidis et al., 2011), seeded and reproducible.

PaddleX shuffles the pooled lines without a seed and without stratification, so a rare class can land entirely
in train. Here each class's positive rate in val stays close to the whole set's, and the same input and seed give
byte-identical files. The replaced lists are moved to numbered ``.bak`` files; lines are kept verbatim.
"""

from __future__ import annotations

import random

import numpy as np

from mlcls_ray import storage
from mlcls_ray.data.mlcls_format import LABEL_FILE, SPLITS, read_dataset
from mlcls_ray.data.problems import Problem

__all__ = ["iterative_stratification", "split_dataset"]


def _pick(values: np.ndarray, candidates: list[int], rng: random.Random) -> int:
    """The candidate with the largest value; ties broken by the seeded generator."""
    best = max(values[c] for c in candidates)
    tied = [c for c in candidates if values[c] == best]
    return tied[0] if len(tied) == 1 else rng.choice(tied)


def iterative_stratification(labels: np.ndarray, ratios: tuple[float, ...], seed: int) -> np.ndarray:
    """Assign each sample of a multi-label set to a subset so every label is spread by ``ratios``.

    Args:
        labels: ``[N, C]`` 0/1 matrix.
        ratios: the subsets' shares, summing to 1.
        seed: seeds the sample order and every tie-break.

    Returns:
        ``[N]`` subset index per sample.
    """
    rng = random.Random(seed)
    y = labels.astype(bool)
    y = np.concatenate([y, ~y.any(axis=1, keepdims=True)], axis=1)  # [N, C+1]: "no label" is stratified too
    n, c = y.shape
    subsets = list(range(len(ratios)))
    want = np.array([r * n for r in ratios])  # [K] samples each subset still wants
    want_label = np.outer(ratios, y.sum(axis=0)).astype(np.float64)  # [K, C+1] positives of each label still wanted
    assigned = np.full(n, -1)
    order = list(range(n))
    rng.shuffle(order)
    remaining = y.sum(axis=0)  # [C+1] unassigned samples per label
    by_label = [[] for _ in range(c)]
    for i in order:
        for label in np.flatnonzero(y[i]):
            by_label[label].append(i)
    while remaining.any():
        # the label with the fewest unassigned samples first: rare labels get placed before common ones crowd them
        fewest = remaining[remaining > 0].min()
        label = rng.choice([int(k) for k in np.flatnonzero(remaining == fewest)])
        for i in by_label[label]:
            if assigned[i] >= 0:
                continue
            best = max(want_label[k, label] for k in subsets)
            tied = [k for k in subsets if want_label[k, label] == best]
            j = _pick(want, tied, rng)
            assigned[i] = j
            own = y[i]
            want_label[j, own] -= 1
            want[j] -= 1
            remaining[own] -= 1
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    _exact_sizes(y, assigned, np.asarray(ratios, dtype=np.float64), rank)
    return assigned


def _exact_sizes(y: np.ndarray, assigned: np.ndarray, ratios: np.ndarray, rank: np.ndarray) -> None:
    """Move the least harmful samples from over-full subsets to under-full ones until the sizes are exact.

    Stratification lands a few samples off the requested sizes; PaddleX users expect ``round(N * pct / 100)``.
    A sample's harm is how much moving it worsens the label balance, each label measured relative to its size.
    """
    n, k = len(assigned), len(ratios)
    target = np.floor(ratios * n + 0.5).astype(np.int64)  # [K]
    target[-1] = n - target[:-1].sum()
    totals = y.sum(axis=0)  # [C+1]
    share = ratios[:, None] * totals  # [K, C+1] positives each subset should hold
    yf = y.astype(np.float64)
    while True:
        extra = np.bincount(assigned, minlength=k) - target  # [K]
        if not extra.any():
            return
        donor, receiver = int(np.argmax(extra)), int(np.argmin(extra))
        held = np.stack([yf[assigned == j].sum(axis=0) for j in range(k)])  # [K, C+1]
        surplus = (held - share) / np.maximum(totals, 1)  # [K, C+1] relative excess of each label
        gain = yf @ (surplus[donor] - surplus[receiver])  # [N] balance gained by moving each sample
        candidates = np.flatnonzero(assigned == donor)
        best = candidates[np.lexsort((rank[candidates], -gain[candidates]))]
        move = max(1, min(extra[donor], -extra[receiver]) // 2)  # half at a time, re-scoring in between
        assigned[best[:move]] = receiver


def split_dataset(root: str, train_percent: int, val_percent: int, seed: int) -> list[Problem]:
    """Pool ``train.txt`` and ``val.txt`` and re-split them by the given percentages.

    Returns the problems that prevented the split (nothing is written then); an empty list means it was done.
    """
    names, entries, problems = read_dataset(root)
    # pooling needs only one list with lines: a missing or empty train.txt or val.txt is what a split fixes
    problems = [p for p in problems if not (p.file != LABEL_FILE and p.kind in ("missing_file", "empty_list"))]
    if not entries and not problems:
        return [Problem("split_skipped", "train.txt", None, "train.txt and val.txt list no images to split")]
    if problems or names is None:
        files = sorted({p.file for p in problems})
        return [Problem("split_skipped", files[0], None,
                        f"split skipped: fix the {len(problems)} problem(s) in {', '.join(files)} first")]

    labels = np.array([e.labels for e in entries], dtype=np.uint8).reshape(-1, len(names))
    assigned = iterative_stratification(labels, (train_percent / 100, val_percent / 100), seed)
    for k, s in enumerate(SPLITS):
        uri = storage.join(root, f"{s}.txt")
        storage.backup(uri)
        storage.write_text(uri, "".join(e.text + "\n" for e, a in zip(entries, assigned) if a == k))
    return []
