"""``Global.mode=label``: label every image of a folder, an ``s3://`` prefix or a list of URIs into Parquet, on Ray
Data, streaming end to end, idempotent and resumable.

``Label.output`` holds the shard plan, the work in progress and the part files (layout:
:mod:`mlcls_ray.infer.label_output`): ``part-<shard>.parquet``, one per shard, each input row exactly once
(``path``, ``class_ids``, ``label_names``, the scores kept by ``Label.scores``, with ``Label.review`` an
``uncertainty``, ``error_kind``, ``error``), written atomically; with ``Label.review=N``, ``review.parquet`` and
``review.html``, the N images the model is least sure about (:mod:`mlcls_ray.infer.review_queue`); ``_SUCCESS``, a
JSON summary written once every shard is complete (removed when a rerun starts); ``_FAILURE``, the record of a failed
run. Readers take ``part-*.parquet``.

One run at a time: the run holds a lease on the output (:mod:`mlcls_ray.infer.lease`), and a second live run is
refused. A rerun never lists the input again and must match what made the rows (model weights, classes,
preprocessing, thresholds, scores kept), or it is refused. It skips complete shards and, for a shard a killed run
cut short, labels only the plan rows its pieces lack. Rows are identified by their plan row, so a write Ray retries
overwrites its own piece and a shard's part holds each row once. Nothing per image is held on the driver: an
``s3://`` prefix or an S3 Inventory is listed into the plan by Ray tasks (a local folder or list streams through the
driver), and it reads back one small row per piece written and per shard completed.
"""

from __future__ import annotations

import collections
import json
import sys
import time

import numpy as np
import pyarrow as pa
import ray
import torch

from mlcls_ray import model_dir, results, storage
from mlcls_ray.config import Config
from mlcls_ray.data.images import ImageDecodeError, device_decodable
from mlcls_ray.data.pipeline import fetch_files
from mlcls_ray.infer import label_output as out
from mlcls_ray.infer import review_queue, thresholds
from mlcls_ray.infer.actors import inference_actors
from mlcls_ray.infer.inputs import input_kind
from mlcls_ray.infer.label_output import LabelSetupError
from mlcls_ray.infer.lease import Lease
from mlcls_ray.infer.predictor import Predictor, decode_square

__all__ = ["FAILURE_FILE", "SUCCESS_FILE", "LabelSetupError", "run_label"]

SUCCESS_FILE = "_SUCCESS"
FAILURE_FILE = "_FAILURE"
_LOAD_BATCH = 32  # images read and decoded per CPU task batch; bounds a task's memory
_TASK_ROWS = 4 * _LOAD_BATCH  # images per decoding task: 77 MB of 448 px squares out, at most
_WRITE_ROWS = 4096  # rows per piece at most (or a shard's size): few pieces, and progress kept often


def _load(batch: dict[str, np.ndarray], size: int, device_decode: bool, max_pixels: int, max_file_bytes: int
          ) -> dict[str, np.ndarray]:
    """Read each file (an S3 object with one GET; one whose listed size, the plan's ``size`` column, is over the limit
    with none), then decode and squish-resize it (the Predictor's CPU half) into ``image``.

    With ``device_decode`` (on a GPU) the rows carry ``data`` instead: a plain JPEG's bytes, judged by its header, for
    the GPU to decode, or, for every other file (PNG, WebP, CMYK, EXIF-rotated, ...), its square decoded here, as raw
    bytes, marked in ``square``: the one GPU actor never decodes with PIL, and no row ships an empty square.
    """
    n = len(batch["path"])
    kinds, reasons = np.full(n, "", dtype=object), np.full(n, "", dtype=object)
    images = np.full(n, b"", dtype=object) if device_decode else np.zeros((n, size, size, 3), np.uint8)
    square = np.zeros(n, bool)  # device_decode: ``data`` holds a decoded square, not a file
    for i, (data, kind, reason) in enumerate(fetch_files(batch["path"], max_file_bytes, batch.get("size"))):
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
    return {"shard": batch["shard"], "row": batch["row"], "path": batch["path"], **columns, "error_kind": kinds,
            "error": reasons}


class _Labeler:
    """Ray Data actor: rows of decoded squares (on a GPU also JPEG files, decoded there) -> label rows, through the
    Predictor."""

    def __init__(self, model: str, device: str, threads: int, threshold, max_pixels: int, device_decode: bool,
                 review: bool = False):
        torch.set_num_threads(threads)
        self.review = review
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
        unsure = review_queue.uncertainty(probs, self.predictor.thresholds) if self.review else None
        return out.label_rows(batch["shard"], batch["row"], batch["path"], probs, self.predictor.labels(probs),
                              kinds, reasons, unsure)


def _normal(uri: str) -> str:
    """A URI as planned and compared: absolute, and without a trailing ``/`` (``s3://b/p/`` is ``s3://b/p``)."""
    uri = storage.absolute(uri)
    return uri.rstrip("/") if storage.is_remote(uri) else uri


def run_label(cfg: Config) -> int:
    """Label; returns the exit code (0 also when some images are bad: they are rows with an ``error``).

    Raises:
        OutputBusyError: another live run holds the output (before anything is written to it).
    """
    output = _normal(cfg["Label.output"] or storage.join(cfg["Global.output"], "labels"))
    with Lease(output) as lease, results.failure_recorded(output, FAILURE_FILE):
        return _label(cfg, output, lease)


def _columns(scores: str, review: int) -> list[str]:
    kept = {"all": ["scores"], "none": []}.get(scores, ["top_class_ids", "top_scores"])
    return ["path", "class_ids", "label_names", *kept, *(["uncertainty"] if review else []), "error_kind", "error"]


def _kept(scores: str, review: int) -> str:
    """The scores the parts keep: a review queue shows each image's top classes, so with one at least the top 5."""
    if not review or scores == "all":
        return scores
    k = 0 if scores == "none" else int(scores.split(":")[1])
    return f"top:{max(k, review_queue.REVIEW_TOP)}"


def _label(cfg: Config, output: str, lease: Lease) -> int:
    model = _normal(cfg["Label.model_dir"] or storage.join(cfg["Global.output"], "best_model"))
    info = model_dir.read_info(model)
    threshold, review = cfg["Label.threshold"], cfg["Label.review"]
    scores = _kept(cfg["Label.scores"], review)
    if scores != cfg["Label.scores"]:
        print(f"[Label] Label.review={review} keeps {scores} scores per image (Label.scores={cfg['Label.scores']}), "
              "to show each image's top classes")
    resolved = thresholds.resolve(threshold, info.label_names, info.thresholds)  # a bad one fails here, not in an actor
    source = _normal(cfg["Label.input"])
    plan = out.load_plan(source, output, cfg["Label.shard_size"],
                         out.producer(model, info, resolved, cfg["Label.scores"], cfg["Label.scores_dtype"],
                                      review > 0))
    storage.delete(storage.join(output, SUCCESS_FILE))  # incomplete again until this run ends
    done, pieces, temporaries = out.list_output(output)
    for name in temporaries:  # a killed run's half-written files: the lease says no live run owns them
        storage.delete(storage.join(output, name))
    tally = out.read_tally(output, done)
    todo, partial = {}, {}  # shard -> rows to label; shard -> its rows still to label, of a shard cut short
    for shard in range(plan["shards"]):
        if shard in done:
            continue
        if shard not in pieces:
            todo[shard] = out.planned_rows(plan, shard)
            continue
        partial[shard] = out.remaining_rows(output, shard, pieces[shard])
        if partial[shard].num_rows:
            todo[shard] = partial[shard].num_rows
        else:  # every row written, the part not yet made when the run stopped
            del partial[shard]
            tally[shard] = out.compact(output, shard, out.planned_rows(plan, shard), pieces[shard])["failed"]
    labeled = sum(todo.values())
    if labeled < plan["images"]:
        print(f"[Label] resuming {output}: {plan['images'] - labeled:,} of {plan['images']:,} images already labeled")
    started = time.monotonic()
    if todo:
        _run_pipeline(cfg, model, info.spec.image_size, threshold, scores, output, plan, todo, partial, tally, lease)
    seconds = time.monotonic() - started
    out.write_tally(output, tally)
    short = [s for s in range(plan["shards"]) if s not in tally]
    if short:
        raise RuntimeError(f"{len(short)} shard(s) were not completely labeled (first: {short[0]}); run the same "
                           "command again to finish them")
    out.remove_work(output)  # empty now, but for pieces of complete shards left by a run stopped midway
    lease.check()
    failed = collections.Counter()
    for counts in tally.values():
        failed.update(counts)
    queue = None
    if review:  # rewritten by every run that ends here, a rerun of a complete output too
        root = source if input_kind(source) == "folder" else ""  # reviewed.txt lines are relative to a folder input
        queue = review_queue.write_review(output, plan["shards"], review, info.label_names, resolved, queue_root=root,
                                          max_pixels=cfg["Global.max_image_pixels"],
                                          max_file_bytes=cfg["Global.max_file_bytes"])
    summary = {"done_flag": True, "input": source, "output": output, "model_dir": model,
               "images": plan["images"], "labeled_this_run": labeled, "failed_images": sum(failed.values()),
               "failed_by_kind": dict(failed.most_common()), "shards": plan["shards"],
               "seconds_this_run": round(seconds, 2),
               "images_per_s_this_run": round(labeled / seconds, 2) if labeled and seconds else None,
               "threshold": threshold, "scores": scores, "scores_dtype": cfg["Label.scores_dtype"],
               "columns": _columns(scores, review), "read": out.PART_GLOB, **({"review": queue} if queue else {})}
    results.write_result(output, SUCCESS_FILE, summary)
    storage.delete(storage.join(output, FAILURE_FILE))
    print(f"[Label] done: {plan['images']:,} images ({labeled:,} this run, "
          f"{summary['images_per_s_this_run'] or 0:,.1f} images/s), {sum(failed.values()):,} failed"
          + (f" ({', '.join(f'{k} {n:,}' for k, n in failed.most_common())})" if failed else "")
          + f"; Parquet: {storage.join(output, out.PART_GLOB)} (summary: {storage.join(output, SUCCESS_FILE)})"
          + (f"; review queue: {queue['images']:,} images in {queue['file']} and {queue['page']}" if queue else ""))
    _show_rows(output, info.label_names)
    return 0


def _show_rows(output: str, names: list[str], n: int = 3) -> None:
    """Print the first rows of the first part file, so a user sees what the Parquet holds."""
    name = "part-000000.parquet"
    table = out.read_parquet(storage.join(output, name)).slice(0, n)
    print(f"[Label] first rows of {name}:")
    for row in table.to_pylist():
        if row.get("scores"):
            top = sorted(zip(row["scores"], range(len(row["scores"]))), reverse=True)[:3]
        else:
            top = list(zip(row.get("top_scores") or [], row.get("top_class_ids") or []))[:3]
        print(f"  {row['path']}: {row['label_names'] if row['error'] is None else row['error']}"
              + (f" (top scores: {', '.join(f'{names[c]} {s:.3f}' for s, c in top)})" if top else ""))


def _run_pipeline(cfg: Config, model: str, size: int, threshold, scores: str, output: str, plan: dict,
                  todo: dict[int, int], partial: dict[int, pa.Table], tally: dict[int, dict], lease: Lease) -> None:
    """Label the rows still to do (``todo``: rows per shard; ``partial``: the rows left of shards cut short), making
    each shard's part as soon as its pieces are all written and adding its failures to ``tally``; print progress."""
    ray.data.DataContext.get_current().enable_progress_bars = False  # our progress lines say more
    fs, _ = storage.resolve(output)
    untouched = [s for s in todo if s not in partial]
    sources = []
    if untouched:
        sources.append(ray.data.read_parquet([storage.resolve(out.shard_uri(output, s))[1] for s in untouched],
                                             filesystem=fs))
    if partial:
        sources.append(ray.data.from_arrow(list(partial.values())))
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
                                         "max_pixels": cfg["Global.max_image_pixels"],
                                         "review": cfg["Label.review"] > 0, **kwargs},
        batch_size=cfg["Label.batch_size"], batch_format="numpy", **actors,
    ).map_batches(out.write_pieces, fn_kwargs={"output": output, "scores": scores,
                                                "scores_dtype": cfg["Label.scores_dtype"]},
                  batch_size=min(_WRITE_ROWS, plan["shard_size"]), batch_format="pyarrow", num_cpus=0.25,
                  runtime_env=env)
    compact = ray.remote(out.compact).options(num_cpus=0.25, runtime_env=env)
    left, making = dict(todo), []  # rows still to come per shard; parts being made
    total, done, failed = sum(todo.values()), 0, collections.Counter()
    started = last = time.monotonic()

    def made(refs: list) -> None:
        for result in ray.get(refs):
            if not result["missing"]:
                tally[result["shard"]] = result["failed"]

    print(f"[Label] labeling {total:,} images with {model} on {cfg['Global.device']}; output: {output}")
    for batch in labeled.iter_batches(batch_size=None, batch_format="pyarrow"):
        for shard, rows, counts in zip(*(batch[k].to_pylist() for k in ("shard", "rows", "failed"))):
            done, left[shard] = done + rows, left[shard] - rows
            failed.update(json.loads(counts))
            if left[shard] == 0:
                making.append(compact.remote(output, shard, out.planned_rows(plan, shard)))
        ready, making = ray.wait(making, num_returns=len(making), timeout=0) if making else ([], [])
        made(ready)
        lease.check()
        now = time.monotonic()
        if now - last > out.PROGRESS_S:
            last, rate = now, done / (now - started)
            out.write_tally(output, tally)  # a run stopped now need not read these parts' footers again
            print(f"[Label] {done:,}/{total:,} images ({done / total:.0%}), {rate:,.1f} images/s, "
                  f"{sum(failed.values()):,} failed, {len(tally):,}/{plan['shards']:,} shards complete, "
                  f"ETA {(total - done) / max(rate, 1e-9):,.0f} s")
    # a shard whose counts did not add up (they should) is still tried: its part is made only if every row is there
    made(making + [compact.remote(output, s, out.planned_rows(plan, s)) for s, n in left.items() if n != 0])
    if failed:
        print(f"mlcls: {sum(failed.values()):,} image(s) could not be labeled: "
              + ", ".join(f"{k} {n:,}" for k, n in failed.most_common()), file=sys.stderr)
