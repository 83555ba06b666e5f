"""``Global.mode=predict``: label an image, a folder, a list file or an ``s3://`` prefix in one process, as PaddleX.

Each image's result is printed and saved as ``<Global.output>/predict/<name>_res.json`` in PaddleX's shape
(``input_path``, ``class_ids``, ``scores``, ``label_names``, highest score first), beside ``<name>_res.jpg``, the
image with its labels drawn below it. An image that cannot be read gets ``{input_path, error_kind, error}`` instead
and the run goes on; the exit code is 1 if any image failed. For millions of images use ``Global.mode=label``.
"""

from __future__ import annotations

import itertools
import json
import posixpath
import sys
from collections import Counter

from mlcls_ray import results, storage
from mlcls_ray.config import Config
from mlcls_ray.data.images import decode_image
from mlcls_ray.data.pipeline import fetch_files
from mlcls_ray.data.report import demo_image_jpeg
from mlcls_ray.devices import torch_device
from mlcls_ray.infer.inputs import iter_inputs, printable
from mlcls_ray.infer.predictor import Predictor

__all__ = ["PREDICT_DIR", "PREDICT_RESULT", "result_image_jpeg", "result_name", "run_predict"]

PREDICT_DIR = "predict"
PREDICT_RESULT = "predict_result.json"


def result_name(uri: str, where: str) -> str:
    """The name of an image's result files, without the ``_res.*`` suffix: its path below the folder walked, its
    file name for a single image, ``<name>_line<N>`` for a list entry (two entries never share one)."""
    if ":" in where:  # <list>:<line>
        return printable(f"{posixpath.splitext(posixpath.basename(uri))[0]}_line{where.rsplit(':', 1)[1]}")
    inside = "/".join(p for p in where.split("/") if p not in ("", ".", ".."))  # a key's `//` or `..` stays inside
    return printable(posixpath.splitext(inside)[0])


def result_image_jpeg(data: bytes, result: dict, max_pixels: int) -> bytes:
    """The image with its labels and scores drawn below it: predict's ``<name>_res.jpg`` and Serve's
    ``result.image``."""
    shown = [f"{n} ({s:.2f})" for n, s in zip(result["label_names"], result["scores"])]
    return demo_image_jpeg(decode_image(data, max_pixels), shown)


def _save(out: str, name: str, result: dict, data: bytes | None, max_pixels: int) -> None:
    storage.write_text(storage.join(out, f"{name}_res.json"), json.dumps({"res": result}, ensure_ascii=False) + "\n")
    if data is not None:
        storage.write_bytes(storage.join(out, f"{name}_res.jpg"), result_image_jpeg(data, result, max_pixels))


def run_predict(cfg: Config) -> int:
    """Predict; returns the exit code. A failure leaves PaddleX's ``done_flag: false`` record."""
    output = cfg["Global.output"]
    with results.failure_recorded(output, PREDICT_RESULT):
        return _predict(cfg, output)


def _predict(cfg: Config, output: str) -> int:
    model = storage.absolute(cfg["Predict.model_dir"] or storage.join(output, "best_model"))
    max_pixels = cfg["Global.max_image_pixels"]
    predictor = Predictor(model, torch_device(cfg["Global.device"]), max_pixels=max_pixels,
                          threshold=cfg["Predict.threshold"])
    out = storage.join(output, PREDICT_DIR)
    images, failed = 0, Counter()
    inputs = iter_inputs(storage.absolute(cfg["Predict.input"]))
    while batch := list(itertools.islice(inputs, cfg["Predict.batch_size"])):
        files = list(fetch_files([uri for uri, _ in batch], cfg["Global.max_file_bytes"]))
        readable = [i for i, (_, kind, _) in enumerate(files) if not kind]
        probs, errors = predictor.score_encoded([files[i][0] for i in readable])
        error = {i: (kind, reason) for i, (_, kind, reason) in enumerate(files) if kind}
        error.update({i: (exc.kind, exc.reason) for i, exc in zip(readable, errors) if exc is not None})
        labels = dict(zip(readable, predictor.labels(probs)))
        for i, (uri, where) in enumerate(batch):
            kind, reason = error.get(i, ("", ""))
            if kind:
                result = {"input_path": printable(uri), "error_kind": kind, "error": reason}
                failed[kind] += 1
            else:
                result = {"input_path": printable(uri), **labels[i]}
            print(json.dumps({"res": result}, ensure_ascii=False))
            _save(out, result_name(uri, where), result, None if kind else files[i][0], max_pixels)
            images += 1
    summary = {"done_flag": True, "model_dir": model, "input": cfg["Predict.input"], "images": images,
               "failed_images": sum(failed.values()), "failed_by_kind": dict(failed.most_common()),
               "results": PREDICT_DIR}
    uri = results.write_result(output, PREDICT_RESULT, summary)
    print(f"predicted {images:,} image(s); results in {out}; summary: {uri}")
    if failed:
        print(f"mlcls: {sum(failed.values()):,} image(s) could not be read: "
              + ", ".join(f"{k} {n:,}" for k, n in failed.most_common()), file=sys.stderr)
    return 1 if failed else 0
