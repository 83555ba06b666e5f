"""The check_dataset mode: convert, split, then validate every line and decode every image, and write the report.

The dataset is only written to by conversion and split, which move the files they replace to numbered ``.bak``
files first. Checking itself never modifies the dataset.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import PurePosixPath

import numpy as np

from mlcls_ray import storage
from mlcls_ray.config import Config
from mlcls_ray.data import report
from mlcls_ray.data.convert import convert_coco
from mlcls_ray.data.images import decode_image
from mlcls_ray.data.mlcls_format import LABEL_FILE, SPLITS, ListEntry, read_dataset
from mlcls_ray.data.pipeline import decode_check
from mlcls_ray.data.problems import Problem, summarize
from mlcls_ray.data.split import split_dataset

__all__ = ["RESULT_FILE", "check_dataset", "run_check_dataset"]

RESULT_FILE = "check_dataset_result.json"
NUM_DEMO_IMAGES = 10  # per split, as PaddleX
_DEMO_SEED = 123  # PaddleX's


def _demo_images(root: str, out_check: str, split: str, entries: list[ListEntry], names: list[str],
                 max_pixels: int) -> list[str]:
    """Draw up to 10 good images of a split with their label names; return their paths relative to the output."""
    chosen = list(entries)
    random.Random(_DEMO_SEED).shuffle(chosen)
    paths = []
    for i, e in enumerate(chosen[:NUM_DEMO_IMAGES]):
        rgb = decode_image(storage.read_bytes(storage.join(root, e.path)), max_pixels)
        label_names = [names[c] for c, v in enumerate(e.labels) if v]
        name = f"{split}_{i:02d}_{PurePosixPath(e.path).stem}.jpg"
        storage.write_bytes(storage.join(out_check, "demo_img", name), report.demo_image_jpeg(rgb, label_names))
        paths.append(f"check_dataset/demo_img/{name}")
    return paths


def _label_file_ref(root: str, output: str) -> str:
    """PaddleX gives label_file relative to <output>/check_dataset; that only makes sense when both are local."""
    label_uri = storage.join(root, LABEL_FILE)
    if storage.is_remote(root) or storage.is_remote(output):
        return label_uri
    return os.path.relpath(storage.resolve(label_uri)[1], storage.resolve(storage.join(output, "check_dataset"))[1])


def check_dataset(root: str, output: str, max_pixels: int,
                  prior_problems: Sequence[Problem] = ()) -> tuple[dict, list[Problem]]:
    """Validate an MLClsDataset fully and write its report, plots and demo images under ``output``.

    Returns the result (as written to ``<output>/check_dataset_result.json``) and the problems found.
    """
    out_check = storage.join(output, "check_dataset")
    names, entries, problems = read_dataset(root)
    problems = list(prior_problems) + problems

    widths, heights, good = [], [], np.zeros(len(entries), dtype=bool)
    for batch in decode_check([e.path for e in entries], root, max_pixels):
        for idx, kind, reason, w, h in zip(batch["index"], batch["kind"], batch["reason"], batch["width"],
                                           batch["height"]):
            if kind:
                e = entries[idx]
                problems.append(Problem(kind, e.file, e.line, reason, e.path))
            else:
                good[idx] = True
                widths.append(w)
                heights.append(h)

    by_split = {s: [e for e in entries if e.file == f"{s}.txt"] for s in SPLITS}
    good_by_split = {s: [e for i, e in enumerate(entries) if good[i] and e.file == f"{s}.txt"] for s in SPLITS}
    attributes = {
        "label_file": _label_file_ref(root, output),
        "num_classes": len(names) if names else 0,
        **{f"{s}_samples": len(by_split[s]) for s in SPLITS},
    }
    analysis: dict = {}
    for s in SPLITS:
        attributes[f"{s}_sample_paths"] = (
            _demo_images(root, out_check, s, good_by_split[s], names, max_pixels) if names else []
        )
    if names:
        matrices = {s: np.array([e.labels for e in by_split[s]], dtype=np.uint8).reshape(-1, len(names))
                    for s in SPLITS}
        storage.write_bytes(storage.join(out_check, "histogram.png"),
                            report.histogram_png(names, matrices["train"].sum(0), matrices["val"].sum(0)))
        storage.write_bytes(storage.join(out_check, "cooccurrence.png"),
                            report.cooccurrence_png(names, np.concatenate(list(matrices.values()))))
        analysis = {"histogram": "check_dataset/histogram.png", "cooccurrence": "check_dataset/cooccurrence.png",
                    **report.label_stats(names, matrices)}
    analysis["image_sizes"] = report.size_stats(np.array(widths, dtype=np.int64), np.array(heights, dtype=np.int64))

    return _write_result(root, output, problems, attributes, analysis), problems


def _write_result(root: str, output: str, problems: list[Problem], attributes: dict, analysis: dict) -> dict:
    """Write ``check_dataset_result.json`` (PaddleX's fields, plus ``error_counts`` and ``errors``), last of all."""
    file_order = {LABEL_FILE: 0, "train.txt": 1, "val.txt": 2}
    problems.sort(key=lambda p: (file_order.get(p.file, -1), p.file, p.line or 0, p.kind))
    counts = Counter(p.kind for p in problems)
    result = {
        "done_flag": True,
        "check_pass": not problems,
        "dataset_path": root,
        "show_type": "image",
        "dataset_type": "MLClsDataset",
        "attributes": attributes,
        "analysis": analysis,
        "error_counts": dict(counts.most_common()),
        "errors": [p.to_dict() for p in problems],
    }
    storage.write_text(storage.join(output, RESULT_FILE), json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


def run_check_dataset(cfg: Config) -> int:
    """``Global.mode=check_dataset``: optional COCO conversion and split, then the full check. Returns the exit code."""
    root, output = cfg["Global.dataset_dir"].rstrip("/"), cfg["Global.output"]
    try:
        return _run(cfg, root, output)
    except Exception as exc:
        # PaddleX's failure record, so tools that poll the result file see the run ended
        failure = {"done_flag": False, "err_type": type(exc).__name__, "err_msg": str(exc)}
        with contextlib.suppress(storage.StorageError):
            storage.write_text(storage.join(output, RESULT_FILE), json.dumps(failure, indent=2) + "\n")
        raise


def _run(cfg: Config, root: str, output: str) -> int:
    max_pixels = cfg["Global.max_image_pixels"]
    prior: list[Problem] = []
    if cfg["CheckDataset.convert.enable"]:
        prior, converted = convert_coco(root)
        if not converted:
            return _finish(_write_result(root, output, prior, {}, {}), prior, output)
        print(f"converted COCO annotations in {root} to MLClsDataset lists")
    if cfg["CheckDataset.split.enable"]:
        split_problems = split_dataset(root, cfg["CheckDataset.split.train_percent"],
                                       cfg["CheckDataset.split.val_percent"], cfg["CheckDataset.split.seed"])
        prior += split_problems
        if not split_problems:
            print(f"re-split {root} with iterative stratification (seed {cfg['CheckDataset.split.seed']})")
    return _finish(*check_dataset(root, output, max_pixels, prior), output)


def _finish(result: dict, problems: list[Problem], output: str) -> int:
    report_uri = storage.join(output, RESULT_FILE)
    if result["check_pass"]:
        a = result["attributes"]
        print(f"Check dataset passed! {a['train_samples']:,} train and {a['val_samples']:,} val images, "
              f"{a['num_classes']} classes. Report: {report_uri}")
        return 0
    print(f"Check dataset failed: {result['dataset_path']}\n{summarize(problems)}\n"
          f"Full list: {report_uri}", file=sys.stderr)
    return 1
