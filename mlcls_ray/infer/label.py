"""``Global.mode=label``: label every image of a folder, an ``s3://`` prefix or a list of URIs into Parquet, on Ray
Data, streaming end to end, idempotent and resumable.

``Label.output`` holds the shard plan and the part files (:mod:`mlcls_ray.infer.label_output`): one row per image
(``path``, ``class_ids``, ``label_names``, ``scores`` of every class in class order, ``error_kind``, ``error``),
each part file written atomically and holding rows of one shard; ``_SUCCESS``, a JSON summary written once every
shard is complete; ``_FAILURE``, the record of a failed run. Names starting with ``_`` or ``.`` are skipped by
Parquet readers (pyarrow, Spark, Ray), so the folder reads as one table.

A rerun with the same output never lists the input again: it counts each shard's rows from its part files' names,
skips complete shards and, for a shard a killed run cut short, labels only the rows its parts lack. No row is
written twice, and nothing per image is held on the driver: it streams the listing into the plan and reads back one
small row per part file written.
"""

from __future__ import annotations

import collections
import json
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from mlcls_ray import model_dir, results, storage
from mlcls_ray.config import Config
from mlcls_ray.data.images import ImageDecodeError, device_decodable
from mlcls_ray.data.pipeline import fetch_files
from mlcls_ray.infer import label_output as out
from mlcls_ray.infer import thresholds
from mlcls_ray.infer.actors import inference_actors
from mlcls_ray.infer.label_output import LabelSetupError
from mlcls_ray.infer.predictor import Predictor, decode_square

__all__ = ["FAILURE_FILE", "SUCCESS_FILE", "LabelSetupError", "run_label"]

SUCCESS_FILE = "_SUCCESS"
FAILURE_FILE = "_FAILURE"
_LOAD_BATCH = 32  # images read and decoded per CPU task batch; bounds a task's memory
_TASK_ROWS = 4 * _LOAD_BATCH  # images per decoding task: 77 MB of 448 px squares out, at most
_WRITE_ROWS = 4096  # rows per part file at most (or a shard's size): few files, and progress kept often


def _load(batch: dict[str, np.ndarray], size: int, device_decode: bool, max_pixels: int, max_file_bytes: int
          ) -> dict[str, np.ndarray]:
    """Read each file, then decode and squish-resize it (the Predictor's CPU half) into ``image``.

    With ``device_decode`` (on a GPU) the rows carry ``data`` instead: a plain JPEG's bytes, judged by its header, for
    the GPU to decode, or, for every other file (PNG, WebP, CMYK, EXIF-rotated, ...), its square decoded here, as raw
    bytes, marked in ``square``: the one GPU actor never decodes with PIL, and no row ships an empty square.
    """
    n = len(batch["path"])
    kinds, reasons = np.full(n, "", dtype=object), np.full(n, "", dtype=object)
    images = np.full(n, b"", dtype=object) if device_decode else np.zeros((n, size, size, 3), np.uint8)
    square = np.zeros(n, bool)  # device_decode: ``data`` holds a decoded square, not a file
    for i, (data, kind, reason) in enumerate(fetch_files(batch["path"], max_file_bytes)):
        if kind:
            kinds[i], reasons[i] = kind, reason
        elif device_decode and device_decodable(data, max_pixels):
            images[i] = data
        else:
            try:
                decoded = decode_square(data, size, max_pixels)  # [S, S, 3] uint8
            except ImageDecodeError as exc:
                kinds[i], reasons[i] = exc.kind, exc.reason
                continue
            if device_decode:
                images[i], square[i] = decoded.tobytes(), True
            else:
                images[i] = decoded
    columns = {"data": images, "square": square} if device_decode else {"image": images}
    return {"shard": batch["shard"], "path": batch["path"], **columns, "error_kind": kinds, "error": reasons}


class _Labeler:
    """Ray Data actor: rows of decoded squares (on a GPU also JPEG files, decoded there) -> label rows, through the
    Predictor."""

    def __init__(self, model: str, device: str, threads: int, threshold, max_pixels: int, device_decode: bool):
        torch.set_num_threads(threads)
        self.predictor = Predictor(model, device, max_pixels=max_pixels, threshold=threshold,
                                   device_decode=device_decode)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        kinds, reasons = batch["error_kind"].copy(), batch["error"].copy()
        good = np.flatnonzero(kinds == "")
        probs = np.zeros((len(kinds), len(self.predictor.label_names)), np.float32)  # [B, C]
        if "image" in batch and len(good):
            probs[good] = self.predictor.probabilities(batch["image"][good])
        elif len(good):
            s = self.predictor.image_size
            items = [np.frombuffer(d, np.uint8).reshape(s, s, 3) if sq else d
                     for d, sq in zip(batch["data"][good], batch["square"][good])]
            probs[good], errors = self.predictor.score_encoded(items)
            for i, exc in zip(good, errors):
                if exc is not None:
                    kinds[i], reasons[i] = exc.kind, exc.reason
        ok = kinds == ""
        labels = self.predictor.labels(probs)
        c = probs.shape[1]
        scores = pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1)), c, mask=pa.array(~ok))
        return pa.table({
            "shard": pa.array(batch["shard"], pa.int32()),
            "path": pa.array(batch["path"], pa.string()),
            "class_ids": pa.array([r["class_ids"] if k else [] for r, k in zip(labels, ok)], pa.list_(pa.int32())),
            "label_names": pa.array([r["label_names"] if k else [] for r, k in zip(labels, ok)],
                                    pa.list_(pa.string())),
            "scores": scores,  # null for an image that failed
            "error_kind": pa.array([k or None for k in kinds], pa.string()),
            "error": pa.array([r or None for r in reasons], pa.string()),
        })


def _write_parts(table: pa.Table, output: str) -> pa.Table:
    """Write the rows of each shard in a batch as one part file; return one row per file written."""
    shards = table["shard"].to_numpy()
    written = {"shard": [], "rows": [], "failed": []}
    for shard in np.unique(shards):
        rows = table.filter(pa.array(shards == shard)).drop_columns(["shard"])
        name = out.part_name(int(shard), rows.num_rows)
        with storage.open_output(storage.join(output, name)) as f:
            pq.write_table(rows, f)
        kinds = collections.Counter(k for k in rows["error_kind"].to_pylist() if k)
        written["shard"].append(int(shard))
        written["rows"].append(rows.num_rows)
        written["failed"].append(json.dumps(kinds))
    return pa.table(written)


def run_label(cfg: Config) -> int:
    """Label; returns the exit code (0 also when some images are bad: they are rows with an ``error``)."""
    output = storage.absolute(cfg["Label.output"] or storage.join(cfg["Global.output"], "labels"))
    with results.failure_recorded(output, FAILURE_FILE):
        return _label(cfg, output)


def _label(cfg: Config, output: str) -> int:
    model = storage.absolute(cfg["Label.model_dir"] or storage.join(cfg["Global.output"], "best_model"))
    info = model_dir.read_info(model)
    threshold = cfg["Label.threshold"]
    thresholds.resolve(threshold, info.label_names, info.thresholds)  # a bad one fails here, not in an actor
    source = storage.absolute(cfg["Label.input"])
    plan = out.load_plan(source, output, cfg["Label.shard_size"])
    parts = out.list_parts(output)
    missing = out.missing_rows(plan, parts, output)
    todo = sum(missing.values())
    if todo < plan["images"]:
        print(f"[Label] resuming {output}: {plan['images'] - todo:,} of {plan['images']:,} images already labeled")
    started = time.monotonic()
    if todo:
        _run_pipeline(cfg, model, info.spec.image_size, threshold, output, plan, [s for s in missing if s not in parts],
                      {s: parts[s] for s in missing if s in parts}, todo)
    seconds = time.monotonic() - started
    parts = out.list_parts(output)
    short = list(out.missing_rows(plan, parts, output))
    if short:
        raise RuntimeError(f"{len(short)} shard(s) were not completely labeled (first: {short[0]}); run the same "
                           "command again to finish them")
    failed = out.failures_in(output, parts)
    summary = {"done_flag": True, "input": source, "output": output, "model_dir": model,
               "images": plan["images"], "labeled_this_run": todo, "failed_images": sum(failed.values()),
               "failed_by_kind": dict(failed.most_common()), "shards": plan["shards"],
               "seconds_this_run": round(seconds, 2),
               "images_per_s_this_run": round(todo / seconds, 2) if todo and seconds else None,
               "threshold": threshold, "columns": ["path", "class_ids", "label_names", "scores", "error_kind",
                                                   "error"]}
    results.write_result(output, SUCCESS_FILE, summary)
    storage.delete(storage.join(output, FAILURE_FILE))
    print(f"[Label] done: {plan['images']:,} images ({todo:,} this run, "
          f"{summary['images_per_s_this_run'] or 0:,.1f} images/s), {sum(failed.values()):,} failed"
          + (f" ({', '.join(f'{k} {n:,}' for k, n in failed.most_common())})" if failed else "")
          + f"; Parquet: {output} (summary: {storage.join(output, SUCCESS_FILE)})")
    _show_rows(output, parts, info.label_names)
    return 0


def _show_rows(output: str, parts: out.Parts, names: list[str], n: int = 3) -> None:
    """Print the first rows of the first part file, so a user sees what the Parquet holds."""
    name = min(parts[min(parts)])[0]
    table = out.read_parquet(storage.join(output, name)).slice(0, n)
    print(f"[Label] first rows of {name}:")
    for row in table.to_pylist():
        top = sorted(zip(row["scores"] or [], range(len(row["scores"] or []))), reverse=True)[:3]
        print(f"  {row['path']}: {row['label_names'] if row['error'] is None else row['error']}"
              + (f" (top scores: {', '.join(f'{names[c]} {s:.3f}' for s, c in top)})" if top else ""))


def _run_pipeline(cfg: Config, model: str, size: int, threshold, output: str, plan: dict, untouched: list[int],
                  partial: out.Parts, todo: int) -> None:
    """Label the rows still to do, printing progress."""
    ray.data.DataContext.get_current().enable_progress_bars = False  # our progress lines say more
    fs, _ = storage.resolve(output)
    sources = []
    if untouched:
        sources.append(ray.data.read_parquet([storage.resolve(out.shard_uri(output, s))[1] for s in untouched],
                                             filesystem=fs))
    if partial:
        sources.append(ray.data.from_arrow([out.remaining_rows(output, s, named) for s, named in partial.items()]))
    rows = sources[0].union(*sources[1:]) if len(sources) > 1 else sources[0]
    # a shard is one block of up to 10,000 URIs; small blocks spread decoding over tasks and start the actors early
    rows = rows.repartition(target_num_rows_per_block=_TASK_ROWS)
    gpu = cfg["Global.device"].startswith("gpu")
    actors = inference_actors(cfg["Global.device"], cfg["Label.concurrency"])
    kwargs = actors.pop("fn_constructor_kwargs")
    # tasks resolve the image and output URIs themselves, with their own node's credentials
    env = {"env_vars": storage.aws_settings()}
    labeled = rows.map_batches(
        _load, fn_kwargs={"size": size, "device_decode": gpu, "max_pixels": cfg["Global.max_image_pixels"],
                          "max_file_bytes": cfg["Global.max_file_bytes"]},
        batch_size=_LOAD_BATCH, batch_format="numpy", num_cpus=0.5, runtime_env=env,  # unfused from the actors
    ).map_batches(
        _Labeler, fn_constructor_kwargs={"model": model, "threshold": threshold, "device_decode": gpu,
                                         "max_pixels": cfg["Global.max_image_pixels"], **kwargs},
        batch_size=cfg["Label.batch_size"], batch_format="numpy", **actors,
    ).map_batches(_write_parts, fn_kwargs={"output": output}, batch_size=min(_WRITE_ROWS, plan["shard_size"]),
                  batch_format="pyarrow", num_cpus=0.25, runtime_env=env)
    done, failed = 0, collections.Counter()
    started = last = time.monotonic()
    print(f"[Label] labeling {todo:,} images with {model} on {cfg['Global.device']}; output: {output}")
    for batch in labeled.iter_batches(batch_size=None, batch_format="pyarrow"):
        done += sum(batch["rows"].to_pylist())
        for counts in batch["failed"].to_pylist():
            failed.update(json.loads(counts))
        now = time.monotonic()
        if now - last > out.PROGRESS_S:
            last, rate = now, done / (now - started)
            print(f"[Label] {done:,}/{todo:,} images ({done / todo:.0%}), {rate:,.1f} images/s, "
                  f"{sum(failed.values()):,} failed, ETA {(todo - done) / max(rate, 1e-9):,.0f} s")
    if failed:
        print(f"mlcls: {sum(failed.values()):,} image(s) could not be labeled: "
              + ", ".join(f"{k} {n:,}" for k, n in failed.most_common()), file=sys.stderr)
