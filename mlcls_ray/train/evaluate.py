"""``Global.mode=evaluate``: score a model folder on the val list with Ray Data and the Predictor.

Writes ``evaluate_result.json`` (PaddleX's ``{"done_flag", "metrics": {"MultiLabelMAP"}}`` plus per-class AP and
micro/macro precision, recall and F1 at 0.5 and at the folder's calibrated thresholds) and ``pr_curve.png``.

No process holds the ``[N, C]`` scores. The scoring actors write each image's logits, cut into blocks of classes,
with its class ids to a scratch Parquet under the output (``_evaluate_scores/``, deleted when done); one Ray task a
block reads its column (:func:`score_block`: per-class AP, the counts behind precision / recall / F1, the PR
histograms) and the driver joins these C-sized parts (:func:`combine_blocks`).
"""

from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from mlcls_ray import model_dir, results, storage  # noqa: E402
from mlcls_ray.config import Config  # noqa: E402
from mlcls_ray.data.labels import csr_dense  # noqa: E402
from mlcls_ray.data.manifest_rows import staging  # noqa: E402
from mlcls_ray.data.mlcls_format import drop_duplicates, read_dataset  # noqa: E402
from mlcls_ray.data.pipeline import read_images  # noqa: E402
from mlcls_ray.data.problems import ProblemLog  # noqa: E402
from mlcls_ray.data.report import figure_png  # noqa: E402
from mlcls_ray.infer.actors import inference_actors  # noqa: E402
from mlcls_ray.infer.predictor import Predictor  # noqa: E402
from mlcls_ray.metrics import average_precision, cross_fitted_counts, prf_counts, prf_from_counts  # noqa: E402

__all__ = ["PR_CURVE_FILE", "combine_blocks", "run_evaluate", "score_block"]

PR_CURVE_FILE = "pr_curve.png"
_SCRATCH = "_evaluate_scores"  # under Global.output, while the block tasks read it
_BLOCK_BYTES = 256 << 20  # one block task's [N, k] float32 logits
_BINS = 1000  # score histogram resolution of the micro-averaged PR curve
_CURVES = 10  # classes drawn one by one: the most frequent


class _Scorer:
    """Ray Data actor: decoded rows -> a table of ``index``, ``error_kind``, ``label_ids`` and fp32 logits, one
    ``scores_<b>`` column (fixed-size lists) per block of classes ``bounds[b]:bounds[b + 1]`` (bad rows get zeros
    and keep their error)."""

    def __init__(self, model: str, device: str, threads: int, bounds: list[int]):
        torch.set_num_threads(threads)
        self.predictor = Predictor(model, device)
        self.bounds = bounds

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        good = batch["error_kind"] == ""
        logits = np.zeros((len(good), self.predictor.info.spec.num_classes), np.float32)  # [B, C]
        if good.any():
            logits[good] = self.predictor.logits(self.predictor.preprocess(list(batch["image"][good])))
        columns = {"index": pa.array(batch["index"]), "error_kind": pa.array(batch["error_kind"], pa.string()),
                   "label_ids": pa.array(list(batch["label_ids"]), pa.list_(pa.int32()))}
        for b, (lo, hi) in enumerate(zip(self.bounds[:-1], self.bounds[1:])):
            columns[f"scores_{b}"] = pa.FixedSizeListArray.from_arrays(pa.array(logits[:, lo:hi].ravel()), hi - lo)
        return pa.table(columns)


def _histograms(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``[2, _BINS + 1]`` counts of positive and negative scores by bin, over every class given (bounded memory)."""
    out = np.zeros((2, _BINS + 1), np.int64)
    for start in range(0, len(probs), 4096):
        bins = np.minimum((probs[start:start + 4096] * _BINS).astype(np.int64), _BINS)
        truth = labels[start:start + 4096].astype(bool)
        out[0] += np.bincount(bins[truth], minlength=_BINS + 1)
        out[1] += np.bincount(bins[~truth], minlength=_BINS + 1)
    return out


def _pr(histograms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at each of the ``_BINS`` thresholds, from :func:`_histograms`."""
    tp, fp = np.cumsum(histograms[0, ::-1]), np.cumsum(histograms[1, ::-1])  # at or above each bin, high to low
    return tp / np.maximum(tp + fp, 1), tp / max(tp[-1], 1)


def score_block(logits: np.ndarray, labels: np.ndarray, thresholds: np.ndarray) -> dict[str, np.ndarray]:
    """The C-sized parts of ``evaluate_result.json`` for a block of k classes.

    Args:
        logits: ``[N, k]`` fp32 logits of every evaluated image, in manifest order (the cross-fitted halves
            depend on it).
        labels: ``[N, k]`` multi-hot.
        thresholds: ``[k]`` the model folder's calibrated thresholds.

    Returns:
        ``ap`` ``[k]``; ``at_0.5``, ``calibrated`` and ``cross_fitted``: :func:`~mlcls_ray.metrics.prf_counts`
        ``[3, k]``; ``histograms`` ``[2, _BINS + 1]`` over the block; ``curve_classes``, the block's ``_CURVES``
        most frequent classes (the whole set's are among the blocks' own), and their ``curve_histograms``.
    """
    probs = torch.from_numpy(logits).sigmoid().numpy()  # float32
    top = np.argsort(-labels.sum(axis=0, dtype=np.int64), kind="stable")[:_CURVES]
    return {
        "ap": average_precision(logits, labels),
        "at_0.5": prf_counts(probs, labels, 0.5),
        "calibrated": prf_counts(probs, labels, np.asarray(thresholds, np.float32)),
        "cross_fitted": cross_fitted_counts(probs, labels),
        "histograms": _histograms(probs, labels),
        "curve_classes": top,
        "curve_histograms": np.stack([_histograms(probs[:, c:c + 1], labels[:, c:c + 1]) for c in top]),
    }


def combine_blocks(blocks: list[dict[str, np.ndarray]], names: list[str]) -> tuple[dict, dict[str, np.ndarray]]:
    """Join :func:`score_block` of consecutive class blocks into the ``metrics`` of ``evaluate_result.json`` and
    what :func:`_pr_curve_png` draws."""
    ap = np.concatenate([b["ap"] for b in blocks])
    counts = {k: np.concatenate([b[k] for b in blocks], axis=1) for k in ("at_0.5", "calibrated", "cross_fitted")}
    starts = np.cumsum([0] + [len(b["ap"]) for b in blocks])
    curves = {int(start + c): h for b, start in zip(blocks, starts) for c, h in zip(b["curve_classes"],
                                                                                  b["curve_histograms"])}
    top = np.argsort(-counts["at_0.5"][2], kind="stable")[:_CURVES]  # by positives
    empty = [names[c] for c in np.flatnonzero(np.isnan(ap))]
    metrics = {
        "MultiLabelMAP": float(np.nanmean(ap)) if len(empty) < len(names) else None,
        "per_class_AP": {n: (None if np.isnan(a) else round(float(a), 6)) for n, a in zip(names, ap)},
        "classes_without_positives": empty,  # excluded from the mAP, as PaddleClas does
        "at_threshold_0.5": prf_from_counts(counts["at_0.5"]),
        # the model folder's thresholds were calibrated on val.txt by training: on that same set, in-sample
        "at_calibrated_thresholds_in_sample": prf_from_counts(counts["calibrated"]),
        "at_thresholds_calibrated_on_the_other_half": prf_from_counts(counts["cross_fitted"]),
    }
    plot = {"ap": ap, "histograms": sum(b["histograms"] for b in blocks), "curves": {c: curves[c] for c in top}}
    return metrics, plot


def _pr_curve_png(plot: dict, names: list[str], images: int) -> bytes:
    fig, ax = plt.subplots(figsize=(6.5, 5))
    precision, recall = _pr(plot["histograms"])
    ax.plot(recall, precision, color="black", linewidth=2, label="micro-average")
    for c, histograms in plot["curves"].items():
        if np.isnan(plot["ap"][c]):
            continue
        p, r = _pr(histograms)
        ax.plot(r, p, linewidth=1, alpha=0.7, label=f"{names[c]} (AP {plot['ap'][c]:.3f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
           title=f"precision-recall on val ({images:,} images)")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return figure_png(fig, dpi=90)


def _block_labels(ids: pa.ListArray, lo: int, hi: int) -> np.ndarray:
    """``[n, hi - lo]`` multi-hot of the classes ``lo:hi`` of rows that carry their class ids."""
    offsets, values = ids.offsets.to_numpy(), ids.values.to_numpy()
    keep = (values >= lo) & (values < hi)
    kept = np.zeros(len(values) + 1, np.int64)
    np.cumsum(keep, out=kept[1:])
    return csr_dense(kept[offsets], values[keep] - lo, hi - lo)


def _score_scratch_block(uri: str, block: int, lo: int, hi: int, thresholds: np.ndarray) -> dict:
    """Ray task: :func:`score_block` of the classes ``lo:hi`` over the good rows of the scratch Parquet, plus
    ``images`` (good rows) and ``failed`` (bad rows by error kind)."""
    fs, path = storage.resolve(uri)
    table = pq.read_table(path, filesystem=fs, columns=["index", "error_kind", "label_ids", f"scores_{block}"])
    good = pc.equal(table["error_kind"], "")
    failed = pc.value_counts(table["error_kind"].filter(pc.invert(good))).to_pylist()
    table = table.filter(good).sort_by("index")  # manifest order, as the cross-fitted halves need
    scores = table[f"scores_{block}"].combine_chunks().flatten()
    logits = scores.to_numpy(zero_copy_only=False, writable=True).reshape(-1, hi - lo)  # torch takes writable arrays
    labels = _block_labels(table["label_ids"].combine_chunks(), lo, hi)
    return {**score_block(logits, labels, thresholds), "images": len(table),
            "failed": {v["values"]: v["counts"] for v in failed}}


def run_evaluate(cfg: Config) -> int:
    """Evaluate; returns the exit code. A failure leaves PaddleX's ``done_flag: false`` record."""
    output = cfg["Global.output"]
    with results.failure_recorded(output, results.EVALUATE_RESULT), staging(output) as stage:
        return _evaluate(cfg, output, stage)


def _evaluate(cfg: Config, output: str, stage: str) -> int:
    weights = storage.absolute(cfg["Evaluate.weight_path"] or storage.join(output, "best_model"))
    info = model_dir.read_info(weights)
    root = cfg["Global.dataset_dir"].rstrip("/")
    with ProblemLog() as problems:
        _, manifest = read_dataset(root, problems, files=("val.txt",))
        manifest = drop_duplicates(manifest, problems)
        if len(problems):
            print(f"mlcls: val.txt has problems; those lines are skipped:\n{problems.summary()}", file=sys.stderr)
    if manifest.num_classes != info.spec.num_classes:
        raise ValueError(f"{weights} has {info.spec.num_classes} classes, but {root}/val.txt has "
                         f"{manifest.num_classes}")
    n, c = len(manifest), info.spec.num_classes
    width = max(1, min(c, _BLOCK_BYTES // (4 * max(n, 1))))
    bounds = [*range(0, c, width), c]
    scratch = storage.absolute(storage.join(output, _SCRATCH))  # the block tasks run in other folders
    storage.delete_dir(scratch)  # a killed run's rows would be read with ours
    ray.data.DataContext.get_current().enable_progress_bars = False
    actors = inference_actors(cfg["Global.device"])
    kwargs = actors.pop("fn_constructor_kwargs")
    scored = read_images(manifest, root, image="rgb", max_pixels=cfg["Global.max_image_pixels"],
                         max_file_bytes=cfg["Global.max_file_bytes"], stage=stage).map_batches(
        _Scorer, fn_constructor_kwargs={"model": weights, "bounds": bounds, **kwargs},
        batch_size=cfg["Evaluate.batch_size"], batch_format="numpy", **actors)
    try:
        fs, path = storage.resolve(scratch)
        scored.write_parquet(path, filesystem=fs)
        task = ray.remote(_score_scratch_block).options(  # the logits, a copy, the probabilities and sort buffers
            memory=5 * 4 * n * width, runtime_env={"env_vars": storage.aws_settings()})
        thresholds = np.asarray(info.thresholds, np.float32)
        blocks = ray.get([task.remote(scratch, b, lo, hi, thresholds[lo:hi])
                          for b, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))])
    finally:
        storage.delete_dir(scratch)
    images, failed = blocks[0]["images"], blocks[0]["failed"]
    metrics, plot = combine_blocks(blocks, info.label_names)
    result = {"done_flag": True, "metrics": metrics, "weight_path": weights, "images": images,
              "failed_images": failed}
    uri = results.write_result(output, results.EVALUATE_RESULT, result)
    storage.write_bytes(storage.join(output, PR_CURVE_FILE), _pr_curve_png(plot, info.label_names, images))
    m = metrics["MultiLabelMAP"]
    print(f"[Eval][Avg] MultiLabelMAP(integral): {m:.5f} over {images:,} val images; result: {uri}"
          if m is not None else f"no val image has a positive label; result: {uri}")
    if failed:
        print(f"mlcls: {sum(failed.values()):,} val image(s) could not be read ({failed}); run check_dataset",
              file=sys.stderr)
    return 1 if failed or m is None else 0
