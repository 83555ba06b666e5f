"""The check_dataset mode: convert, split, then validate every line and decode every image, and write the report.

The dataset is only written to by conversion and split, which replace the lists together and keep the old ones as
numbered ``.bak`` files. Checking itself never modifies the dataset.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import PurePosixPath

import numpy as np

from mlcls_ray import results, storage
from mlcls_ray.config import Config
from mlcls_ray.data import report
from mlcls_ray.data.convert import convert_coco
from mlcls_ray.data.images import decode_image
from mlcls_ray.data.manifest import Manifest
from mlcls_ray.data.manifest_rows import staging
from mlcls_ray.data.mlcls_format import LABEL_FILE, SPLITS, drop_duplicates, read_dataset, split_rows
from mlcls_ray.data.parquet_lists import list_suffix, set_aside_other_form
from mlcls_ray.data.pipeline import read_images
from mlcls_ray.data.problems import Problem, ProblemLog
from mlcls_ray.data.split import split_dataset

__all__ = ["CLASS_COUNTS_FILE", "ERRORS_FILE", "MAX_ERRORS_IN_RESULT", "RESULT_FILE", "check_dataset",
           "run_check_dataset"]

RESULT_FILE = "check_dataset_result.json"
ERRORS_FILE = "check_dataset/errors.jsonl"  # every problem, one JSON object a line, sorted by file and line
CLASS_COUNTS_FILE = "check_dataset/class_counts.csv"  # every class's images per split: the JSON lists at most 200
MAX_ERRORS_IN_RESULT = 10_000  # the result JSON keeps the first ones; a bad 100M-image dataset stays readable
NUM_DEMO_IMAGES = 10  # per split, as PaddleX
_DEMO_SEED = 123  # PaddleX's


def _demo_images(root: str, out_check: str, split: str, manifest: Manifest, rows: np.ndarray, names: list[str],
                 max_pixels: int) -> list[str]:
    """Draw up to 10 good images of a split with their label names; return their paths relative to the output.

    A demo image is an illustration: one that cannot be drawn is skipped with a note, never a failed check.
    """
    rng = np.random.default_rng(_DEMO_SEED)
    chosen = rng.choice(rows, size=min(NUM_DEMO_IMAGES, len(rows)), replace=False) if len(rows) else rows
    paths = []
    for i, row in enumerate(chosen):
        rel = manifest.paths[int(row)].as_py()
        name = f"{split}_{i:02d}_{PurePosixPath(rel).stem}.jpg"
        try:
            rgb = decode_image(storage.read_bytes(storage.join(root, rel)), max_pixels)
            label_names = [names[c] for c in np.flatnonzero(manifest.labels(slice(row, row + 1))[0])]
            storage.write_bytes(storage.join(out_check, "demo_img", name), report.demo_image_jpeg(rgb, label_names))
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, the check's verdict does not depend on it
            print(f"note: no demo image for {rel} ({type(exc).__name__}: {exc})", file=sys.stderr)
            continue
        paths.append(f"check_dataset/demo_img/{name}")
    return paths


def _label_file_ref(root: str, output: str) -> str:
    """PaddleX gives label_file relative to <output>/check_dataset; that only makes sense when both are local."""
    label_uri = storage.join(root, LABEL_FILE)
    if storage.is_remote(root) or storage.is_remote(output):
        return label_uri
    return os.path.relpath(storage.resolve(label_uri)[1], storage.resolve(storage.join(output, "check_dataset"))[1])


def _decode_all(manifest: Manifest, root: str, output: str, max_pixels: int, max_file_bytes: int,
                problems: ProblemLog) -> tuple[np.ndarray, report.SizeStats]:
    """Read and decode every image on Ray; returns ``[N]`` bool (decoded fine) and their size statistics. A large
    manifest is staged under ``output`` for the workers to read."""
    good = np.zeros(len(manifest), bool)
    sizes = report.SizeStats()
    if not len(manifest):
        return good, sizes
    with staging(output) as stage:
        ds = read_images(manifest, root, image="none", max_pixels=max_pixels, max_file_bytes=max_file_bytes,
                         stage=stage)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            ok = batch["error_kind"] == ""
            good[batch["index"][ok]] = True
            sizes.add(batch["width"][ok], batch["height"][ok])
            bad = ~ok
            for row, path, kind, reason in zip(batch["index"][bad], batch["path"][bad], batch["error_kind"][bad],
                                               batch["error_reason"][bad]):
                problems.append(Problem(kind, manifest.files[manifest.file[row]], int(manifest.line[row]), reason,
                                        path))
    return good, sizes


def check_dataset(root: str, output: str, max_pixels: int, max_file_bytes: int, problems: ProblemLog) -> dict:
    """Validate an MLClsDataset fully and write its report, plots and demo images under ``output``.

    Problems go to ``problems`` (which may already hold those of conversion and split). Returns the result, as
    written to ``<output>/check_dataset_result.json``.
    """
    out_check = storage.join(output, "check_dataset")
    names, manifest = read_dataset(root, problems)
    manifest = drop_duplicates(manifest, problems)
    good, sizes = _decode_all(manifest, root, output, max_pixels, max_file_bytes, problems)

    splits = {s: split_rows(manifest, s) for s in SPLITS}
    attributes = {
        "label_file": _label_file_ref(root, output),
        "num_classes": len(names) if names else 0,
        **{f"{s}_samples": int(rows.sum()) for s, rows in splits.items()},
    }
    analysis: dict = {}
    for s, rows in splits.items():
        attributes[f"{s}_sample_paths"] = (
            _demo_images(root, out_check, s, manifest, np.flatnonzero(rows & good), names, max_pixels)
            if names else []
        )
    if names:
        counts = {s: manifest.class_counts(rows) for s, rows in splits.items()}
        storage.write_bytes(storage.join(out_check, "histogram.png"),
                            report.histogram_png(names, counts["train"], counts["val"]))
        storage.write_bytes(storage.join(output, CLASS_COUNTS_FILE), report.class_counts_csv(names, counts))
        heatmap, pairs = report.cooccurrence(names, manifest)
        storage.write_bytes(storage.join(out_check, "cooccurrence.png"), heatmap)
        analysis = {"histogram": "check_dataset/histogram.png", "cooccurrence": "check_dataset/cooccurrence.png",
                    "class_counts_file": CLASS_COUNTS_FILE, "top_cooccurring_pairs": pairs,
                    **report.label_stats(names, manifest, splits)}
    analysis["image_sizes"] = sizes.summary()
    return _write_result(root, output, problems, attributes, analysis)


def _write_result(root: str, output: str, problems: ProblemLog, attributes: dict, analysis: dict) -> dict:
    """Write the errors file, then ``check_dataset_result.json`` (PaddleX's fields, plus the error summary)."""
    first = problems.write_jsonl(storage.join(output, ERRORS_FILE), head=MAX_ERRORS_IN_RESULT)
    result = {
        "done_flag": True,
        "check_pass": not len(problems),
        "dataset_path": root,
        "show_type": "image",
        "dataset_type": "MLClsDataset",
        "attributes": attributes,
        "analysis": analysis,
        "error_counts": dict(problems.counts.most_common()),
        "errors_file": ERRORS_FILE,
        "errors": first,
    }
    results.write_result(output, RESULT_FILE, result)
    return result


def run_check_dataset(cfg: Config) -> int:
    """``Global.mode=check_dataset``: optional COCO conversion and split, then the full check. Returns the exit code."""
    root, output = cfg["Global.dataset_dir"].rstrip("/"), cfg["Global.output"]
    with ProblemLog() as problems, results.failure_recorded(output, RESULT_FILE):
        return _run(cfg, root, output, problems)


def _run(cfg: Config, root: str, output: str, problems: ProblemLog) -> int:
    convert, split = cfg["CheckDataset.convert.enable"], cfg["CheckDataset.split.enable"]
    list_format = cfg["CheckDataset.convert.list_format"]
    with tempfile.TemporaryDirectory(prefix="mlcls-convert-") as scratch:
        source = root
        if convert:
            # converted lists that are about to be split go to a scratch folder first, so the dataset gets one
            # replacement: a repeated convert + split then finds the same lists and rewrites nothing
            source = scratch if split else root
            if not convert_coco(root, problems, out=source, list_format=list_format):
                return _finish(_write_result(root, output, problems, {}, {}), problems, output)
            print(f"converted COCO annotations in {root} to MLClsDataset lists")
        if split:
            seed = cfg["CheckDataset.split.seed"]
            if split_dataset(source, cfg["CheckDataset.split.train_percent"], seed, problems, out=root):
                print(f"split {root} with iterative stratification (seed {seed}); lists it replaced are kept as .bak")
            elif source != root:
                # keep the conversion, so the check below names what stopped the split
                _install(source, root, list_suffix(list_format))
    result = check_dataset(root, output, cfg["Global.max_image_pixels"], cfg["Global.max_file_bytes"], problems)
    return _finish(result, problems, output)


def _install(scratch: str, root: str, suffix: str) -> None:
    """Move converted lists from a scratch folder into the dataset, as one replacement."""
    names = [LABEL_FILE, *(f"{s}{suffix}" for s in SPLITS)]
    with storage.replacing([storage.join(root, name) for name in names]) as staged:
        for name in names:
            storage.write_bytes(staged[storage.join(root, name)], storage.read_bytes(storage.join(scratch, name)))
    set_aside_other_form(root, suffix, SPLITS)


def _finish(result: dict, problems: ProblemLog, output: str) -> int:
    report_uri = storage.join(output, RESULT_FILE)
    if result["check_pass"]:
        a = result["attributes"]
        print(f"Check dataset passed! {a['train_samples']:,} train and {a['val_samples']:,} val images, "
              f"{a['num_classes']} classes. Report: {report_uri}")
        return 0
    print(f"Check dataset failed: {result['dataset_path']}\n{problems.summary()}\n"
          f"Report: {report_uri}\nEvery problem: {storage.join(output, ERRORS_FILE)}", file=sys.stderr)
    return 1
