"""``Global.mode=evaluate``: score a model folder on ``val.txt`` with Ray Data and the Predictor.

Writes ``evaluate_result.json`` (PaddleX's ``{"done_flag", "metrics": {"MultiLabelMAP"}}`` plus per-class AP and
micro/macro precision, recall and F1 at 0.5 and at the folder's calibrated thresholds) and ``pr_curve.png``.
"""

from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from mlcls_ray import model_dir, results, storage  # noqa: E402
from mlcls_ray.config import Config  # noqa: E402
from mlcls_ray.data.mlcls_format import drop_duplicates, read_dataset  # noqa: E402
from mlcls_ray.data.pipeline import read_images  # noqa: E402
from mlcls_ray.data.problems import ProblemLog  # noqa: E402
from mlcls_ray.data.report import figure_png  # noqa: E402
from mlcls_ray.infer.actors import inference_actors  # noqa: E402
from mlcls_ray.infer.predictor import Predictor  # noqa: E402
from mlcls_ray.metrics import average_precision, cross_fitted_f1, precision_recall_f1  # noqa: E402

__all__ = ["PR_CURVE_FILE", "evaluate", "run_evaluate"]

PR_CURVE_FILE = "pr_curve.png"
_BINS = 1000  # score histogram resolution of the micro-averaged PR curve
_CURVES = 10  # classes drawn one by one: the most frequent


class _Scorer:
    """Ray Data actor: decoded rows -> fp32 logits, through the Predictor (bad rows get zeros and keep their error)."""

    def __init__(self, model: str, device: str, threads: int):
        torch.set_num_threads(threads)
        self.predictor = Predictor(model, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        good = batch["error_kind"] == ""
        logits = np.zeros((len(good), self.predictor.info.spec.num_classes), np.float32)  # [B, C]
        if good.any():
            logits[good] = self.predictor.logits(self.predictor.preprocess(list(batch["image"][good])))
        return {"index": batch["index"], "logits": logits, "error_kind": batch["error_kind"]}


def _micro_pr(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Micro-averaged precision and recall at ``_BINS`` thresholds, from score histograms (bounded memory)."""
    pos, neg = np.zeros(_BINS + 1), np.zeros(_BINS + 1)
    for start in range(0, len(probs), 4096):
        bins = np.minimum((probs[start:start + 4096] * _BINS).astype(np.int64), _BINS)
        truth = labels[start:start + 4096].astype(bool)
        pos += np.bincount(bins[truth], minlength=_BINS + 1)
        neg += np.bincount(bins[~truth], minlength=_BINS + 1)
    tp, fp = np.cumsum(pos[::-1]), np.cumsum(neg[::-1])  # predicted positive at or above each bin, high to low
    return tp / np.maximum(tp + fp, 1), tp / max(tp[-1], 1)


def _pr_curve_png(probs: np.ndarray, labels: np.ndarray, names: list[str], ap: np.ndarray) -> bytes:
    fig, ax = plt.subplots(figsize=(6.5, 5))
    precision, recall = _micro_pr(probs, labels)
    ax.plot(recall, precision, color="black", linewidth=2, label="micro-average")
    for c in np.argsort(-labels.sum(axis=0, dtype=np.int64))[:_CURVES]:
        if np.isnan(ap[c]):
            continue
        p, r = _micro_pr(probs[:, c:c + 1], labels[:, c:c + 1])
        ax.plot(r, p, linewidth=1, alpha=0.7, label=f"{names[c]} (AP {ap[c]:.3f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
           title=f"precision-recall on val ({len(probs):,} images)")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return figure_png(fig, dpi=90)


def evaluate(logits: np.ndarray, labels: np.ndarray, names: list[str], thresholds: list[float]
             ) -> tuple[dict, np.ndarray, np.ndarray]:
    """The metrics of ``evaluate_result.json`` from fp32 logits ``[N, C]`` and labels ``[N, C]``; also returns
    the probabilities ``[N, C]`` and per-class AP ``[C]`` (NaN for classes without positives)."""
    ap = average_precision(logits, labels)
    probs = torch.from_numpy(logits).sigmoid().numpy()  # float32
    empty = [names[c] for c in np.flatnonzero(np.isnan(ap))]
    return {
        "MultiLabelMAP": float(np.nanmean(ap)) if len(empty) < len(names) else None,
        "per_class_AP": {n: (None if np.isnan(a) else round(float(a), 6)) for n, a in zip(names, ap)},
        "classes_without_positives": empty,  # excluded from the mAP, as PaddleClas does
        "at_threshold_0.5": precision_recall_f1(probs, labels, 0.5),
        # the model folder's thresholds were calibrated on val.txt by training: on that same set, in-sample
        "at_calibrated_thresholds_in_sample": precision_recall_f1(probs, labels, np.asarray(thresholds, np.float32)),
        "at_thresholds_calibrated_on_the_other_half": cross_fitted_f1(probs, labels),
    }, probs, ap


def run_evaluate(cfg: Config) -> int:
    """Evaluate; returns the exit code. A failure leaves PaddleX's ``done_flag: false`` record."""
    output = cfg["Global.output"]
    with results.failure_recorded(output, results.EVALUATE_RESULT):
        return _evaluate(cfg, output)


def _evaluate(cfg: Config, output: str) -> int:
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
    ray.data.DataContext.get_current().enable_progress_bars = False
    actors = inference_actors(cfg["Global.device"])
    kwargs = actors.pop("fn_constructor_kwargs")
    scored = read_images(manifest, root, image="rgb", max_pixels=cfg["Global.max_image_pixels"],
                         max_file_bytes=cfg["Global.max_file_bytes"]).map_batches(
        _Scorer, fn_constructor_kwargs={"model": weights, **kwargs}, batch_size=cfg["Evaluate.batch_size"],
        batch_format="numpy", **actors)
    logits = np.zeros((n, c), np.float32)  # [N, C]: exact mAP needs every score; 4 bytes x N x C on the driver
    good = np.zeros(n, bool)
    failed: dict[str, int] = {}
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        ok = batch["error_kind"] == ""
        logits[batch["index"][ok]] = batch["logits"][ok]
        good[batch["index"][ok]] = True
        for kind in batch["error_kind"][~ok]:
            failed[kind] = failed.get(kind, 0) + 1
    labels = manifest.labels(np.flatnonzero(good))
    metrics, probs, ap = evaluate(logits[good], labels, info.label_names, info.thresholds)
    result = {"done_flag": True, "metrics": metrics, "weight_path": weights, "images": int(good.sum()),
              "failed_images": failed}
    uri = results.write_result(output, results.EVALUATE_RESULT, result)
    storage.write_bytes(storage.join(output, PR_CURVE_FILE), _pr_curve_png(probs, labels, info.label_names, ap))
    m = metrics["MultiLabelMAP"]
    print(f"[Eval][Avg] MultiLabelMAP(integral): {m:.5f} over {int(good.sum()):,} val images; result: {uri}"
          if m is not None else f"no val image has a positive label; result: {uri}")
    if failed:
        print(f"mlcls: {sum(failed.values()):,} val image(s) could not be read ({failed}); run check_dataset",
              file=sys.stderr)
    return 1 if failed or m is None else 0
