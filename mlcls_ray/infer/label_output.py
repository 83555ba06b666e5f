"""The layout of a label output folder: the plan, the parts, what produced them, and what a rerun still has to do.

- ``_plan/shard-<N>.parquet``: the input listed once into shards, one row per input row (``shard``, ``row``, its
  index in the shard, ``path``, the URI's bytes: a local name that is not UTF-8 is kept exactly, and ``size``, its
  bytes as an S3 listing or inventory gave them, -1 for a local file or a list's entry). An ``s3://`` prefix or an
  S3 Inventory is listed by Ray tasks (:mod:`mlcls_ray.infer.listing`) and the shards written by tasks; a local
  folder or a list file is streamed through the driver.
  ``_plan/_COMPLETE.json`` marks the listing complete and records what produces the rows (:func:`producer`).
- ``_work/shard-<N>/piece-<first row>-<digest>.parquet``: labeled rows of one shard as the pipeline writes them,
  with their plan ``row``. A piece is named by the rows it holds, so a write task Ray retries overwrites its own
  piece instead of adding a second copy.
- ``part-<N>.parquet``: a whole shard, every plan row exactly once, in plan order, made by :func:`compact` from the
  shard's pieces once they hold every row (a row in two pieces, as a differently batched retry leaves it, is kept
  once); then the pieces are deleted. A shard is complete when its part exists: row identity, not a count.
- ``_plan/_TALLY.json``: the failed images by kind of each complete shard, so a summary reads no part again.

Readers take ``part-*.parquet`` (names starting with ``_`` or ``.`` are skipped by pyarrow, Spark and Ray anyway:
``_plan/``, ``_work/``, ``_LEASE``, and the ``.tmp-*`` of a write in flight).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import time
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from mlcls_ray import storage
from mlcls_ray.infer import listing
from mlcls_ray.infer.inputs import IMAGE_EXTENSIONS, input_kind, iter_inputs, printable

if TYPE_CHECKING:  # the tasks that write plan shards, pieces and parts import this module: no torch for them
    from mlcls_ray.model_dir import ModelInfo

__all__ = ["PART_GLOB", "PLAN_DIR", "PROGRESS_S", "LabelSetupError", "compact", "label_rows", "list_output",
           "load_plan", "part_uri", "planned_rows", "producer", "read_tally", "remaining_rows", "remove_work",
           "shard_uri", "write_pieces", "write_tally"]

PLAN_DIR = "_plan"
WORK_DIR = "_work"
PART_GLOB = "part-*.parquet"  # what readers read: no plan, no pieces, no temporaries
_PLAN_DONE = "_COMPLETE.json"
_TALLY = "_TALLY.json"
_FORMAT = 2  # 1: parts named by row counts (uuid names), no producer record
_PART = re.compile(r"part-(\d+)\.parquet")
_PIECE = re.compile(rf"{WORK_DIR}/shard-(\d+)/piece-\d+-[0-9a-f]+\.parquet")
_FAILED_KEY = b"mlcls.failed_by_kind"  # a part's footer: its failed images by kind, for a tally rebuilt by hand
_COMPRESSION = "zstd"
PROGRESS_S = 10.0  # seconds between progress lines, while listing and while labeling


class LabelSetupError(ValueError):
    """The labeling run cannot start as configured; the message says what to change."""


def shard_uri(output: str, shard: int) -> str:
    return storage.join(output, PLAN_DIR, f"shard-{shard:06d}.parquet")


def part_uri(output: str, shard: int) -> str:
    return storage.join(output, f"part-{shard:06d}.parquet")


def _write_parquet(uri: str, table: pa.Table) -> None:
    with storage.open_output(uri) as f:
        pq.write_table(table, f, compression=_COMPRESSION)


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = storage.resolve(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


def _sha256(uri: str, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with storage.open_input(uri) as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def producer(model: str, info: ModelInfo, thresholds: np.ndarray, scores: str, scores_dtype: str,
             review: bool = False) -> dict:
    """What makes the rows: the model (its folder, a digest of its weights, its classes and preprocessing), the
    resolved per-class thresholds, the scores kept and whether rows carry an ``uncertainty`` (``Label.review``). A
    rerun into the same output must match it."""
    from mlcls_ray import model_dir

    spec = info.spec
    return {"model_dir": model, "weights_sha256": _sha256(storage.join(model, model_dir.WEIGHTS_FILE)),
            "image_size": spec.image_size, "mean": [float(m) for m in spec.mean], "std": [float(s) for s in spec.std],
            "label_names": list(info.label_names), "thresholds": [float(t) for t in thresholds],
            "scores": scores, "scores_dtype": scores_dtype, "review": review}


_WHAT = {"weights_sha256": "the weights (sha256 of model.safetensors)", "image_size": "the image size",
         "mean": "the normalisation mean", "std": "the normalisation std", "label_names": "the classes",
         "thresholds": "the thresholds (Label.threshold or the model's)", "scores": "Label.scores",
         "scores_dtype": "Label.scores_dtype", "review": "whether Label.review > 0 (the uncertainty column)"}


def _check_producer(planned: dict, now: dict, output: str) -> None:
    planned = {"review": False, **planned}  # an output labeled before Label.review existed has no uncertainty
    differ = [k for k in _WHAT if planned.get(k) != now[k]]
    if differ:
        shown = {k: (planned.get(k), now[k]) if k not in ("label_names", "thresholds", "mean", "std") else None
                 for k in differ}
        detail = "; ".join(_WHAT[k] + (f" {shown[k][0]!r} there, {shown[k][1]!r} now" if shown[k] else "")
                           for k in differ)
        raise LabelSetupError(f"Label.output {output} holds labels made by another model or setting ({detail}; "
                              f"it was labeled with {planned.get('model_dir')}); rerun with what made it, or give a "
                              "new Label.output")
    if planned["model_dir"] != now["model_dir"]:
        print(f"[Label] {output} was labeled with {planned['model_dir']}; {now['model_dir']} has the same weights, "
              "classes and preprocessing, so the run goes on")


def _write_plan_shard(output: str, shard: int, rows: pa.Table) -> None:
    """A shard of the plan from its rows' ``path`` (bytes) and ``size``."""
    n = rows.num_rows
    table = pa.table({"shard": pa.array(np.full(n, shard, np.int32)), "row": pa.array(np.arange(n, dtype=np.int32)),
                      "path": rows["path"], "size": rows["size"]})
    _write_parquet(shard_uri(output, shard), table)


def _write_listed_shard(output: str, shard: int, runs: list[listing.Run]) -> None:
    """A Ray task: a shard of the plan from the listed runs that make it up."""
    tables = ray.get([run.table for run in runs])
    _write_plan_shard(output, shard, pa.concat_tables(t.slice(r.start, r.rows) for t, r in zip(tables, runs)))


def _plan_listed(output: str, runs: list[listing.Run], shard_size: int) -> tuple[int, int]:
    """Write the plan's shards from listed runs, in Ray tasks; ``(images, shards)``."""
    write = ray.remote(_write_listed_shard).options(num_cpus=0.25, runtime_env={"env_vars": storage.aws_settings()})
    written, pieces, filled, images = [], [], 0, 0
    for run in runs:
        start, left = run.start, run.rows
        while left:
            take = min(left, shard_size - filled)
            pieces.append(listing.Run(run.table, start, take))
            start, left, filled, images = start + take, left - take, filled + take, images + take
            if filled == shard_size:
                written.append(write.remote(output, len(written), pieces))
                pieces, filled = [], 0
    if pieces:
        written.append(write.remote(output, len(written), pieces))
    ray.get(written)
    return images, len(written)


def load_plan(source: str, output: str, shard_size: int, made_by: dict) -> dict:
    """List the input once into shards under ``_plan/``, or read back the plan an earlier run completed.

    Raises:
        LabelSetupError: the output holds the labels of another input, of another model or setting, or of an
            earlier layout; or the input holds no image.
    """
    marker = storage.join(output, PLAN_DIR, _PLAN_DONE)
    if storage.exists(marker):
        plan = json.loads(storage.read_text(marker))
        if plan.get("format") != _FORMAT:
            raise LabelSetupError(f"Label.output {output} was written by an earlier version of mlcls-ray (another "
                                  "part layout); label into a new Label.output")
        if plan["input"] != source:
            raise LabelSetupError(f"Label.output {output} holds the labels of {plan['input']}, not of {source}; "
                                  "use another Label.output")
        _check_producer(plan["producer"], made_by, output)
        if plan["shard_size"] != shard_size:
            print(f"mlcls: {output} was planned with Label.shard_size={plan['shard_size']}; resuming with that")
        return plan
    kind = input_kind(source)
    if kind == "inventory" or (kind == "folder" and storage.is_remote(source)):
        runs = (listing.list_inventory if kind == "inventory" else listing.list_prefix)(source, PROGRESS_S)
        images, shards = _plan_listed(output, runs, shard_size)
    else:
        images, shards = _plan_streamed(source, output, shard_size)
    if not images:
        raise LabelSetupError(f"Label.input {source}: no images found (extensions {', '.join(IMAGE_EXTENSIONS)})")
    plan = {"format": _FORMAT, "input": source, "shard_size": shard_size, "images": images, "shards": shards,
            "producer": made_by}
    storage.write_text(marker, json.dumps(plan, indent=2) + "\n")
    print(f"[Label] listed {images:,} images of {source} into {shards:,} shard(s)")
    return plan


def _plan_streamed(source: str, output: str, shard_size: int) -> tuple[int, int]:
    """Write the plan's shards from a local folder, an image or a list file, streamed; ``(images, shards)``."""
    shards, images, paths = 0, 0, []
    started = last = time.monotonic()

    def write() -> None:
        _write_plan_shard(output, shards, pa.table({"path": pa.array(paths, pa.binary()),
                                                    "size": pa.array(np.full(len(paths), -1, np.int64))}))

    for uri, _ in iter_inputs(source):
        paths.append(os.fsencode(uri))  # the exact bytes of a local name; a URI's UTF-8
        if len(paths) == shard_size:
            write()
            shards, images, paths = shards + 1, images + len(paths), []
            if time.monotonic() - last > PROGRESS_S:
                last = time.monotonic()
                print(f"[Label] listed {images:,} images ({images / (last - started):,.0f}/s)")
    if paths:
        write()
        shards, images = shards + 1, images + len(paths)
    return images, shards


def planned_rows(plan: dict, shard: int) -> int:
    last = plan["images"] - plan["shard_size"] * (plan["shards"] - 1)
    return last if shard == plan["shards"] - 1 else plan["shard_size"]


def list_output(output: str) -> tuple[set[int], dict[int, list[str]], list[str]]:
    """``(complete shards, {shard: its pieces}, temporaries)`` of an output folder, from one listing."""
    done, pieces, temporaries = set(), collections.defaultdict(list), []
    for name in storage.list_files(output) if storage.exists(output) else []:
        if match := _PART.fullmatch(name):
            done.add(int(match[1]))
        elif match := _PIECE.fullmatch(name):
            pieces[int(match[1])].append(name)
        elif name.rsplit("/", 1)[-1].startswith(".tmp-"):
            temporaries.append(name)
    return done, dict(pieces), temporaries


def _present(output: str, pieces: list[str]) -> np.ndarray:
    """The plan rows the pieces hold (each once)."""
    rows = [read_parquet(storage.join(output, p), ["row"])["row"].to_numpy() for p in pieces]
    return np.unique(np.concatenate(rows)) if rows else np.zeros(0, np.int32)


def remaining_rows(output: str, shard: int, pieces: list[str]) -> pa.Table:
    """The plan rows of a shard that its pieces lack (a path listed twice is two rows: each is labeled once)."""
    plan = read_parquet(shard_uri(output, shard))
    return plan.filter(pc.invert(pc.is_in(plan["row"], pa.array(_present(output, pieces), pa.int32()))))


def label_rows(shard: np.ndarray, row: np.ndarray, paths: np.ndarray, probs: np.ndarray, labels: list[dict],
               kinds: np.ndarray, reasons: np.ndarray, uncertainty: np.ndarray | None = None) -> pa.Table:
    """The labeler's rows: plan ``shard`` and ``row``, ``path``, the labels, every class's score (float32, null for
    an image that failed), the ``uncertainty`` when given (null for a failed image) and the error columns;
    :func:`write_pieces` turns the scores into what is kept."""
    ok = kinds == ""
    scores = pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1)), probs.shape[1], mask=pa.array(~ok))
    review = {} if uncertainty is None else {"uncertainty": pa.array(uncertainty, pa.float32(), mask=~ok)}
    return pa.table({
        "shard": pa.array(shard, pa.int32()),
        "row": pa.array(row, pa.int32()),
        "path": pa.array([printable(bytes(p)) for p in paths], pa.string()),
        "class_ids": pa.array([r["class_ids"] if k else [] for r, k in zip(labels, ok)], pa.list_(pa.int32())),
        "label_names": pa.array([r["label_names"] if k else [] for r, k in zip(labels, ok)], pa.list_(pa.string())),
        "scores": scores,
        **review,
        "error_kind": pa.array([k or None for k in kinds], pa.string()),
        "error": pa.array([r or None for r in reasons], pa.string()),
    })


def _keep_scores(table: pa.Table, scores: str, dtype: str) -> pa.Table:
    """``all``: every class's score as ``scores``; ``top:K``: ``top_class_ids`` and ``top_scores``, the K highest,
    highest first; ``none``: no score column. In ``dtype`` (``float16`` halves the bytes, to about 3 digits)."""
    at, column = table.column_names.index("scores"), table["scores"].combine_chunks()
    table = table.drop_columns(["scores"])
    c, kind = column.type.list_size, pa.float16() if dtype == "float16" else pa.float32()
    probs = column.values.slice(column.offset * c, len(column) * c).to_numpy().reshape(-1, c)  # [N, C], failed too
    failed = pa.array(column.is_null().to_numpy(zero_copy_only=False))
    if scores == "all":
        return table.add_column(at, "scores", pa.FixedSizeListArray.from_arrays(
            pa.array(probs.astype(dtype).reshape(-1), kind), c, mask=failed))
    if scores == "none":
        return table
    k = min(int(scores.split(":")[1]), c)
    ids = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # [N, K]
    top = np.take_along_axis(probs, ids, axis=1).astype(dtype)
    table = table.add_column(at, "top_class_ids", pa.FixedSizeListArray.from_arrays(
        pa.array(ids.astype(np.int32).reshape(-1)), k, mask=failed))
    return table.add_column(at + 1, "top_scores", pa.FixedSizeListArray.from_arrays(
        pa.array(top.reshape(-1), kind), k, mask=failed))


def write_pieces(table: pa.Table, output: str, scores: str, scores_dtype: str) -> pa.Table:
    """Ray Data's write step: each shard's rows of a batch as one piece, named by its rows (a retried task writes
    the same name again); returns one row per piece (``shard``, ``rows``, ``failed``: counts by kind as JSON)."""
    shards = table["shard"].to_numpy()
    written = {"shard": [], "rows": [], "failed": []}
    for shard in np.unique(shards):
        rows = table.filter(pa.array(shards == shard)).drop_columns(["shard"])
        rows = rows.take(pc.sort_indices(rows["row"]))
        index = rows["row"].to_numpy()
        name = f"piece-{index[0]:06d}-{hashlib.sha1(index.astype(np.int32).tobytes()).hexdigest()[:16]}.parquet"
        _write_parquet(storage.join(output, WORK_DIR, f"shard-{shard:06d}", name), _keep_scores(rows, scores,
                                                                                                 scores_dtype))
        written["shard"].append(int(shard))
        written["rows"].append(rows.num_rows)
        written["failed"].append(json.dumps(collections.Counter(k for k in rows["error_kind"].to_pylist() if k)))
    return pa.table(written)


def compact(output: str, shard: int, planned: int, pieces: list[str] | None = None) -> dict:
    """Make ``part-<shard>.parquet`` from the shard's pieces if they hold every plan row, then delete the pieces.

    Each row is kept once (the first piece holding it), in plan order; the part is written atomically and only
    whole. Runs as a Ray task (it holds one shard's rows) or inline. ``pieces`` defaults to a listing of the shard.

    Returns:
        ``{"shard", "missing": rows no piece holds, "failed": {kind: images}}`` (``failed`` only when written).
    """
    folder = storage.join(output, WORK_DIR, f"shard-{shard:06d}")
    if pieces is None:
        pieces = [storage.join(WORK_DIR, f"shard-{shard:06d}", n) for n in storage.list_files(folder)
                  if n.startswith("piece-")]
    tables = [read_parquet(storage.join(output, p)) for p in pieces]
    rows = pa.concat_tables(tables) if tables else None
    index = rows["row"].to_numpy() if rows is not None else np.zeros(0, np.int32)
    unique, first = np.unique(index, return_index=True)  # sorted: plan order
    if len(unique) < planned:
        return {"shard": shard, "missing": planned - len(unique), "failed": {}}
    part = rows.take(pa.array(first)).drop_columns(["row"])
    failed = dict(collections.Counter(k for k in part["error_kind"].to_pylist() if k))
    part = part.replace_schema_metadata({**(part.schema.metadata or {}), _FAILED_KEY: json.dumps(failed)})
    _write_parquet(part_uri(output, shard), part)
    for p in pieces:
        storage.delete(storage.join(output, p))
    return {"shard": shard, "missing": 0, "failed": failed}


def remove_work(output: str) -> None:
    """Delete ``_work/`` once every shard has its part."""
    storage.delete_dir(storage.join(output, WORK_DIR))


def read_tally(output: str, done: set[int]) -> dict[int, dict[str, int]]:
    """Failed images by kind of each complete shard: from ``_TALLY.json``, and from the footer of any part it lacks
    (a run stopped between writing a part and the tally)."""
    uri = storage.join(output, PLAN_DIR, _TALLY)
    tally = {int(k): v for k, v in json.loads(storage.read_text(uri)).items()} if storage.exists(uri) else {}
    tally = {s: v for s, v in tally.items() if s in done}
    for shard in sorted(done - set(tally)):
        fs, path = storage.resolve(part_uri(output, shard))
        meta = pq.read_metadata(path, filesystem=fs).metadata or {}
        tally[shard] = json.loads(meta.get(_FAILED_KEY, b"{}"))
    return tally


def write_tally(output: str, tally: dict[int, dict[str, int]]) -> None:
    tallied = {str(k): v for k, v in sorted(tally.items())}
    storage.write_text(storage.join(output, PLAN_DIR, _TALLY), json.dumps(tallied))
