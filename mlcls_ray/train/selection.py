"""Model selection on rank 0: whole-val-set mAP of the raw and EMA weights, the better of them, and ``best_model/``.

A model whose val scores are not all finite has diverged: its mAP is NaN (NaN or inf would otherwise rank first
and give a finite mAP), ``train.log`` says so, and it is never saved as the best.
"""

from __future__ import annotations

import numpy as np
import torch

from mlcls_ray import model_dir, results, storage
from mlcls_ray.metrics import calibrate_thresholds, mean_average_precision
from mlcls_ray.models.zoo import ModelSpec
from mlcls_ray.train.progress import RunLog

__all__ = ["best_on_disk", "select_best"]

_WEIGHTS = ("raw", "ema")


def select_best(config: dict, spec: ModelSpec, record: dict, logits: list[np.ndarray], labels: np.ndarray,
                models: list[torch.nn.Module], best: dict | None, log: RunLog) -> dict | None:
    """Score raw (and EMA) weights on the whole val set into ``record``; write ``best_model/`` when the better one
    beats ``best``. Returns the best so far."""
    bad = [int((~np.isfinite(lg)).any(axis=1).sum()) for lg in logits]  # val images with a NaN or inf score
    maps = [float("nan") if n else mean_average_precision(lg, labels) for lg, n in zip(logits, bad)]
    for which, value in zip(_WEIGHTS, maps):
        record[f"map_{which}"] = value
    epoch = record["epoch"]
    for which, lg, n in zip(_WEIGHTS, logits, bad):
        if n:
            log(f"[Eval][Epoch {epoch}] DIVERGED: the {which} weights give NaN or inf scores for {n:,} of "
                f"{len(lg):,} val images; they are not a candidate for best_model (lower Train.learning_rate, or "
                "try -o Train.precision=fp32)")
    if all(np.isnan(maps)):
        record["score"] = float("nan")
        return best
    pick = int(np.nanargmax(maps))
    record["score"] = float(maps[pick])
    line = f"[Eval][Epoch {epoch}][Avg] MultiLabelMAP(integral): {maps[pick]:.5f}, raw {maps[0]:.5f}"
    line += f", EMA {maps[1]:.5f}" if len(maps) > 1 else ""
    log(line + f" over {len(labels):,} val images")
    if best is not None and maps[pick] <= best["score"]:
        return best
    probs = torch.from_numpy(logits[pick]).sigmoid_().numpy()  # in place, float32
    thresholds = calibrate_thresholds(probs, labels)
    best = {"score": float(maps[pick]), "epoch": epoch, "weights": _WEIGHTS[pick], "run": config["run_name"]}
    model_dir.save(storage.join(config["output"], "best_model"), spec, models[pick].state_dict(),
                   config["label_names"], thresholds, extra=best)
    log(f"[Eval][Epoch {epoch}] new best model ({_WEIGHTS[pick]} weights, mAP {maps[pick]:.5f}) saved to "
        f"{storage.join(config['output'], 'best_model')}")
    results.write_result(config["output"], results.TRAIN_RESULT,
                         results.train_result(spec.name, best, [], done=False))
    return best


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
