"""The one writer of the ``*_result.json`` files, in PaddleX's shape (``paddlex-module.md`` §9).

``train_result.json``: ``model_name``, ``label_dict``, ``train_log``, ``visualdl_log``, ``config``, ``models``
(``best`` and ``last_1``... newest first, each with its ``score`` and paths relative to ``Global.output``) and
``done_flag``. A failed run gets ``{"done_flag": false, "err_type", "err_msg"}`` instead, so tools that poll the
file see that it ended.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

from mlcls_ray import storage
from mlcls_ray.errors import root_cause

__all__ = ["EVALUATE_RESULT", "LABEL_DICT", "TRAIN_RESULT", "failure_recorded", "train_result", "write_result"]

TRAIN_RESULT = "train_result.json"
EVALUATE_RESULT = "evaluate_result.json"
LABEL_DICT = "label_dict.txt"


def write_result(output: str, name: str, result: dict) -> str:
    uri = storage.join(output, name)
    storage.write_text(uri, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return uri


@contextlib.contextmanager
def failure_recorded(output: str, name: str) -> Iterator[None]:
    """Run a mode; if it raises, leave PaddleX's failure record in ``name`` so tools that poll the file see the run
    ended, and re-raise. A storage error while writing the record must not hide the original failure."""
    try:
        yield
    except Exception as exc:
        with contextlib.suppress(storage.StorageError):
            write_result(output, name, {"done_flag": False, "err_type": type(exc).__name__,
                                        "err_msg": root_cause(exc)})
        raise


def train_result(model_name: str, best: dict | None, checkpoints: list[dict], done: bool) -> dict:
    """Args:
        best: ``{"score", "epoch", "weights"}`` of best_model/, or None before the first evaluation.
        checkpoints: ``{"score", "epoch", "path"}`` of the kept checkpoints, newest first; ``path`` relative to
            the output.
    """
    models: dict = {}
    if best is not None:
        models["best"] = {**best, "model_dir": "best_model", "inference_config": "best_model/inference.yml",
                          "safetensors": "best_model/model.safetensors"}
    for i, ck in enumerate(checkpoints, 1):
        models[f"last_{i}"] = {"score": ck["score"], "epoch": ck["epoch"], "checkpoint": ck["path"]}
    return {"model_name": model_name, "label_dict": LABEL_DICT, "train_log": "train.log",
            "visualdl_log": "tensorboard", "config": "config.yaml", "models": models, "done_flag": done}
