"""Model selection: whole-val-set mAP of the raw and EMA weights, the better of them, and ``best_model/``.

Every rank takes part: each computes the AP (and, for a new best, the calibrated thresholds) of its block of
classes over every val image, and rank 0 gathers the C numbers, decides, logs and alone writes files. A model whose
val scores are not all finite has diverged: its mAP is NaN (NaN or inf would otherwise rank first and give a finite
mAP), ``train.log`` says so, and it is never saved as the best.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from mlcls_ray import model_dir, results, storage
from mlcls_ray.metrics import average_precision, calibrate_thresholds, class_mean
from mlcls_ray.models.zoo import ModelSpec
from mlcls_ray.train.progress import RunLog
from mlcls_ray.train.scoring import broadcast_from_rank0, gather_rows, sum_over_ranks, to_class_block

__all__ = ["best_on_disk", "select_best"]

_WEIGHTS = ("raw", "ema")


def select_best(config: dict, spec: ModelSpec, record: dict, logits: list[np.ndarray], labels: np.ndarray,
                models: list[torch.nn.Module], best: dict | None, log: RunLog | None,
                group: dist.ProcessGroup | None = None) -> dict | None:
    """Score raw (and EMA) weights on the whole val set into ``record``; write ``best_model/`` when the better one
    beats ``best``. Returns the best so far.

    Every rank calls it with its own val rows: ``logits`` ``[n, C]`` fp32 of each model (the picked model's are
    overwritten with probabilities) and ``labels`` ``[n, C]``. Rank 0 passes ``log`` and gets the scores in
    ``record``; the other ranks return ``best`` unchanged. ``group``: the gloo group of the exchanges.
    """
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    bad = sum_over_ranks([int((~np.isfinite(lg)).any(axis=1).sum()) for lg in logits], group)  # NaN or inf rows
    label_block = to_class_block(labels, group)  # [N, C_rank]
    aps = [None if n else gather_rows(average_precision(to_class_block(lg, group), label_block), group)
           for lg, n in zip(logits, bad)]
    pick = _decide(record, aps, bad, len(label_block), best, log) if rank0 else -1
    pick = broadcast_from_rank0(pick, group)  # the model to save, or -1: rank 0 alone knows best_model/ on disk
    if pick < 0:
        return best
    probs = torch.from_numpy(to_class_block(logits[pick], group)).sigmoid_().numpy()  # in place, float32
    thresholds = gather_rows(calibrate_thresholds(probs, label_block), group)
    if not rank0:
        return best
    score, epoch = record["score"], record["epoch"]
    best = {"score": score, "epoch": epoch, "weights": _WEIGHTS[pick], "run": config["run_name"]}
    model_dir.save(storage.join(config["output"], "best_model"), spec, models[pick].state_dict(),
                   config["label_names"], thresholds, extra=best)
    log(f"[Eval][Epoch {epoch}] new best model ({_WEIGHTS[pick]} weights, mAP {score:.5f}) saved to "
        f"{storage.join(config['output'], 'best_model')}")
    results.write_result(config["output"], results.TRAIN_RESULT,
                         results.train_result(spec.name, best, [], done=False))
    return best


def _decide(record: dict, aps: list[np.ndarray | None], bad: list[int], images: int, best: dict | None,
            log: RunLog) -> int:
    """On rank 0: the mAPs into ``record`` and ``train.log``; the model that beats ``best``, or -1."""
    maps = [float("nan") if ap is None else class_mean(ap) for ap in aps]
    for which, value in zip(_WEIGHTS, maps):
        record[f"map_{which}"] = value
    epoch = record["epoch"]
    for which, n in zip(_WEIGHTS, bad):
        if n:
            log(f"[Eval][Epoch {epoch}] DIVERGED: the {which} weights give NaN or inf scores for {n:,} of "
                f"{images:,} val images; they are not a candidate for best_model (lower Train.learning_rate, or "
                "try -o Train.precision=fp32)")
    if all(np.isnan(maps)):
        record["score"] = float("nan")
        return -1
    pick = int(np.nanargmax(maps))
    record["score"] = float(maps[pick])
    line = f"[Eval][Epoch {epoch}][Avg] MultiLabelMAP(integral): {maps[pick]:.5f}, raw {maps[0]:.5f}"
    line += f", EMA {maps[1]:.5f}" if len(maps) > 1 else ""
    log(line + f" over {images:,} val images")
    return -1 if best is not None and maps[pick] <= best["score"] else pick


def best_on_disk(output: str, best: dict | None, run_name: str, resumed: bool) -> dict | None:
    """The better of the checkpoint's best and the best_model/ on disk, when that model belongs to this run or the
    one resumed: a group restarted after writing a new best but before its checkpoint was registered starts from an
    older best (or none), and must not replace the newer model with a worse one. A new run starts afresh."""
    try:
        on_disk = model_dir.read_info(storage.join(output, "best_model")).extra
    except ValueError:
        return best
    ours = on_disk.get("run") == run_name or resumed
    if ours and "score" in on_disk and (best is None or on_disk["score"] > best["score"]):
        return {k: on_disk[k] for k in ("score", "epoch", "weights", "run") if k in on_disk}
    return best
