"""``Label.review=N``: how unsure the model is of an image, and the queue of the N images a person should label next.

The measure is margin sampling with per-class thresholds. A class decides on its threshold ``t_k``, not on 0.5, so its
margin is the distance between the score and the threshold in logit space, ``|logit(p_k) - logit(t_k)|``: symmetric,
and as large for 0.999 against 0.5 as for 0.001. Each class adds ``exp(-margin)``: 1 at its threshold, about 0 when
confident either way; the sum over classes ranks an image with several undecided classes above one with a single
borderline class, which least-confidence or entropy over one softmax cannot express for multi-label outputs. The
labels a person gives such an image move the most decision boundaries, so it teaches the next model most.
``exp(-|logit p - logit t|)`` is ``min(r, 1/r)`` with ``r`` the ratio of the odds of ``p`` and ``t``: no log, no exp.

The labeling actors compute it (:func:`uncertainty`) into the parts' ``uncertainty`` column, whatever scores are
kept; at the end :func:`write_review` reads that column one part at a time, keeps a running top N, and writes
``review.parquet`` (rank 1 = least sure; failed images never enter) and ``review.html`` beside the parts.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mlcls_ray import storage
from mlcls_ray.infer.label_output import part_uri

__all__ = ["REVIEW_FILE", "REVIEW_PAGE", "REVIEW_TOP", "select", "uncertainty", "write_review"]

REVIEW_FILE = "review.parquet"
REVIEW_PAGE = "review.html"
REVIEW_TOP = 5  # classes shown per image: the highest scores
_EPS = 1e-6  # scores and thresholds clipped to [eps, 1 - eps]: a saturated score keeps a finite margin
_CANDIDATE = pa.schema({"path": pa.string(), "uncertainty": pa.float32(), "label_names": pa.list_(pa.string()),
                        "top_class_ids": pa.list_(pa.int32()), "top_scores": pa.list_(pa.float32())})


def _odds(p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), _EPS, 1 - _EPS)
    return p / (1 - p)


def uncertainty(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """``sum_k exp(-|logit(p_k) - logit(t_k)|)`` of each image.

    Args:
        probs: ``[N, C]`` scores.
        thresholds: ``[C]`` the per-class thresholds the labels are decided on.

    Returns:
        ``[N]`` float32, in ``[0, C]``: a class at its threshold adds 1, a confident one about 0.
    """
    ratio = _odds(probs) / _odds(thresholds)  # [N, C] exp(logit p - logit t)
    return np.minimum(ratio, 1 / ratio).sum(axis=1).astype(np.float32)


def _top(part: pa.Table, take: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``([n, K] class ids, [n, K] scores)``, highest first, of rows ``take`` of a part, from the scores it keeps."""
    if "scores" in part.column_names:
        column = part["scores"].take(pa.array(take)).combine_chunks()
        c = column.type.list_size
        probs = column.values.slice(column.offset * c, len(column) * c).to_numpy().reshape(-1, c)  # [n, C]
        ids = np.argsort(-probs, axis=1, kind="stable")[:, :REVIEW_TOP]
        return ids, np.take_along_axis(probs, ids, axis=1)
    ids = np.array(part["top_class_ids"].take(pa.array(take)).to_pylist(), np.int32).reshape(len(take), -1)
    scores = np.array(part["top_scores"].take(pa.array(take)).to_pylist(), np.float32).reshape(len(take), -1)
    return ids[:, :REVIEW_TOP], scores[:, :REVIEW_TOP]


def _lists(matrix: np.ndarray) -> pa.ListArray:
    """``[n, K]`` -> n lists of K."""
    n, k = matrix.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)), pa.array(matrix.reshape(-1)))


def _candidates(part: pa.Table, take: np.ndarray, u: np.ndarray) -> pa.Table:
    """Rows ``take`` of a part, with ``u`` their uncertainty, as the running top N holds them."""
    ids, scores = _top(part, take)
    return pa.table({"path": part["path"].take(pa.array(take)), "uncertainty": pa.array(u[take], pa.float32()),
                     "label_names": part["label_names"].take(pa.array(take)),
                     "top_class_ids": _lists(ids.astype(np.int32)), "top_scores": _lists(scores.astype(np.float32))},
                    schema=_CANDIDATE)



def select(output: str, shards: int, n: int) -> pa.Table:
    """The ``n`` labeled images of highest uncertainty, highest first (ties in plan order), reading one part at a time:
    its ``uncertainty`` column, and its other columns only when some of its rows enter the running top ``n``."""
    best = _CANDIDATE.empty_table()
    for shard in range(shards):
        with storage.open_input(part_uri(output, shard), seekable=True) as f:
            part = pq.ParquetFile(f)
            u = pc.fill_null(part.read(columns=["uncertainty"])["uncertainty"], -np.inf).to_numpy()  # failed: null
            take = np.argsort(-u, kind="stable")[:n]
            take = take[u[take] > (best["uncertainty"][-1].as_py() if best.num_rows == n else -np.inf)]
            if not len(take):
                continue
            kept = [c for c in ("scores", "top_class_ids", "top_scores") if c in part.schema_arrow.names]
            found = _candidates(part.read(columns=["path", "label_names", *kept]), take, u)
        best = pa.concat_tables([best, found])
        best = best.take(pa.array(np.argsort(-best["uncertainty"].to_numpy(), kind="stable")[:n]))  # ties: plan order
    return best


def write_review(output: str, shards: int, n: int, names: list[str], thresholds: np.ndarray, *, queue_root: str,
                 max_pixels: int, max_file_bytes: int) -> dict:
    """Write ``review.parquet`` (rank 1 = least sure) and ``review.html`` under ``output``, from its ``shards`` parts;
    returns the summary's ``review`` entry (``images``, ``file``, ``page``)."""
    from mlcls_ray.audit.review_page import review_page  # the page's HTML and thumbnails only when a queue is made

    best = select(output, shards, n)
    ids = best["top_class_ids"].to_pylist()
    table = pa.table({
        "path": best["path"],
        "rank": pa.array(np.arange(1, best.num_rows + 1, dtype=np.int64)),
        "uncertainty": best["uncertainty"],
        "label_names": best["label_names"],
        "top_class_ids": best["top_class_ids"],
        "top_class_names": pa.array([[names[c] for c in row] for row in ids], pa.list_(pa.string())),
        "top_scores": best["top_scores"],
        "top_thresholds": pa.array([[float(thresholds[c]) for c in row] for row in ids], pa.list_(pa.float32())),
    })
    uri, page = storage.join(output, REVIEW_FILE), storage.join(output, REVIEW_PAGE)
    with storage.open_output(uri) as f:
        pq.write_table(table, f, compression="zstd")
    storage.write_text(page, review_page("queue", table, lambda p: p, names, title=f"Review queue: {output}",
                                         max_pixels=max_pixels, max_file_bytes=max_file_bytes, queue_root=queue_root))
    return {"images": table.num_rows, "file": uri, "page": page}
