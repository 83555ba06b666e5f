"""``Label.input`` listed in Ray tasks, as ordered runs of Arrow rows (``path``: the URI's bytes; ``size``: its
bytes as listed) that stay in the object store: the driver holds a few numbers per run, nothing per image.

- An ``s3://`` prefix is listed one level deep (``Delimiter="/"``), a task per sub-prefix, recursively, so a tree
  of folders lists in parallel. A task takes up to 50 pages of its level, then hands the rest to a task of
  its own. The keys directly below one prefix come from its one paginator: a flat prefix (no ``/`` below it) is
  listed by a chain of tasks one after another, off the driver but no faster than the sequential paginator. A run
  is cut wherever a sub-prefix falls between two keys, so no two runs overlap and, sorted by their first key, they
  give S3's key order: the same rows, in the same order, as the sequential listing.
- An S3 Inventory report, named by its ``manifest.json``, is read a data file per task: CSV (gzip, no header,
  columns per ``fileSchema``, keys URL-encoded) or Parquet. The runs come in the manifest's file order, each file's
  rows in its order. A versioned inventory keeps the latest version of each key, and no delete marker.

Only image keys are kept (:data:`mlcls_ray.infer.inputs.IMAGE_EXTENSIONS`), and no folder marker.
"""

from __future__ import annotations

import bisect
import json
import time
from typing import NamedTuple
from urllib.parse import unquote_plus

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import ray

from mlcls_ray import storage
from mlcls_ray.infer.inputs import IMAGE_EXTENSIONS, InputError, is_image

__all__ = ["Run", "list_inventory", "list_prefix"]

_TASK_CPUS = 0.25  # listing waits on S3: several tasks share a CPU
_IMAGE = r"(?i)(" + "|".join(e.replace(".", r"\.") for e in IMAGE_EXTENSIONS) + r")$"
_COLUMNS = {"bucket": "bucket", "key": "key", "size": "size", "islatest": "is_latest",
            "isdeletemarker": "is_delete_marker"}  # an inventory's columns we read, by name without case or `_`


class Run(NamedTuple):
    """Rows ``start`` to ``start + rows`` of a listed table in the object store, in the order of the plan."""

    table: ray.ObjectRef
    start: int
    rows: int


def _table(paths: list[str], sizes: list[int]) -> pa.Table:
    return pa.table({"path": pa.array([p.encode() for p in paths], pa.binary()), "size": pa.array(sizes, pa.int64())})


def _list_pages(prefix: str, token: str | None, pages: int, page_keys: int) -> tuple[dict, pa.Table]:
    """Up to ``pages`` pages of one level of ``prefix``: ``({runs: [(first key, start, rows)], folders, token,
    listed}, table of the image keys)``; ``token`` is where a next task goes on (None when the level is done)."""
    paths, sizes, folders, listed = [], [], [], 0
    for _ in range(pages):
        keys, found, below, token = storage.list_level(prefix, token, page_keys)
        listed += len(keys)
        for key, size in zip(keys, found):
            if is_image(key):
                paths.append(key)
                sizes.append(size)
        folders += below
        if token is None:
            break
    cuts = sorted({0, len(paths), *(bisect.bisect_left(paths, f) for f in folders)})
    runs = [(paths[a], a, b - a) for a, b in zip(cuts, cuts[1:]) if b > a]
    return {"runs": runs, "folders": folders, "token": token, "listed": listed}, _table(paths, sizes)


def _progress(what: str, listed: int, started: float) -> None:
    print(f"[Label] {what}: {listed:,} keys ({listed / max(time.monotonic() - started, 1e-9):,.0f}/s)")


def list_prefix(uri: str, progress_s: float, pages: int = 50, page_keys: int = 1000) -> list[Run]:
    """The image objects below an ``s3://`` prefix as runs in S3's key order, listed by Ray tasks.

    Args:
        progress_s: seconds between progress lines.
        pages, page_keys: a task's share of a level: ``pages`` requests of ``page_keys`` keys.

    Raises:
        StorageError: a listing request failed.
    """
    task = ray.remote(_list_pages).options(num_cpus=_TASK_CPUS, num_returns=2,
                                           runtime_env={"env_vars": storage.aws_settings()})
    pending: dict[ray.ObjectRef, tuple[str, ray.ObjectRef]] = {}  # listing result -> (its prefix, its table)
    found: list[tuple[str, Run]] = []
    listed, started = 0, time.monotonic()
    last = started

    def submit(prefix: str, token: str | None) -> None:
        meta, table = task.remote(prefix, token, pages, page_keys)
        pending[meta] = (prefix, table)

    submit(uri, None)
    while pending:
        ray.wait(list(pending), num_returns=1)
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
        for ref in ready:
            prefix, table = pending.pop(ref)
            meta = ray.get(ref)
            found += [(first, Run(table, start, rows)) for first, start, rows in meta["runs"]]
            for folder in meta["folders"]:
                submit(folder, None)
            if meta["token"] is not None:
                submit(prefix, meta["token"])
            listed += meta["listed"]
        if time.monotonic() - last > progress_s:
            last = time.monotonic()
            _progress(f"listing {uri}, {len(pending):,} prefixes in flight", listed, started)
    found.sort(key=lambda f: f[0])  # disjoint runs: their first keys order them as S3 orders the keys
    return [run for _, run in found]


def _columns(names: list[str], where: str) -> dict[str, str]:
    """Our name -> the inventory's, of the columns we read; the bucket and key must be there."""
    have = {_COLUMNS[n.strip().lower().replace("_", "")]: n.strip() for n in names
            if n.strip().lower().replace("_", "") in _COLUMNS}
    if "bucket" not in have or "key" not in have:
        raise InputError(f"{where}: an S3 Inventory without a Bucket and a Key column (columns: {', '.join(names)})")
    return have


def _read_inventory_file(uri: str, file_format: str, schema: list[str]) -> tuple[dict, pa.Table]:
    """One inventory data file's image objects: ``({runs: [(None, 0, rows)]}, table)``."""
    try:
        if file_format == "CSV":
            have = _columns(schema, uri)
            types = {"size": pa.int64(), "is_latest": pa.bool_(), "is_delete_marker": pa.bool_()}
            with storage.open_input(uri) as f:  # gunzipped, as pyarrow does for a `.gz` name
                table = pacsv.read_csv(f, read_options=pacsv.ReadOptions(column_names=[n.strip() for n in schema]),
                                       convert_options=pacsv.ConvertOptions(
                                           include_columns=list(have.values()),
                                           column_types={have[k]: t for k, t in types.items() if k in have}))
            table = table.rename_columns([{v: k for k, v in have.items()}[n] for n in table.column_names])
            table = table.set_column(table.column_names.index("key"), "key",
                                     pa.array([unquote_plus(k) for k in table["key"].to_pylist()], pa.string()))
        else:
            fs, path = storage.resolve(uri)
            have = _columns(pq.read_schema(path, filesystem=fs).names, uri)
            table = pq.read_table(path, filesystem=fs, columns=list(have.values()))
            table = table.rename_columns([{v: k for k, v in have.items()}[n] for n in table.column_names])
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{uri}: not a readable S3 Inventory {file_format} file ({exc})") from exc
    keep = pc.match_substring_regex(table["key"], _IMAGE)
    if "is_latest" in table.column_names:
        keep = pc.and_kleene(keep, pc.fill_null(table["is_latest"], True))
    if "is_delete_marker" in table.column_names:
        keep = pc.and_kleene(keep, pc.invert(pc.fill_null(table["is_delete_marker"], False)))
    table = table.filter(keep)
    paths = pc.binary_join_element_wise("s3://", table["bucket"], "/", table["key"], "")
    sizes = pc.fill_null(table["size"], -1) if "size" in table.column_names else pa.array([-1] * len(table), pa.int64())
    out = pa.table({"path": paths.cast(pa.binary()), "size": sizes.cast(pa.int64())})
    return {"runs": [(None, 0, len(out))] if len(out) else []}, out


def list_inventory(manifest: str, progress_s: float) -> list[Run]:
    """The image objects an S3 Inventory report lists, as runs in the manifest's file order, read by Ray tasks.

    Args:
        manifest: the report's ``manifest.json`` (its data files are read from the manifest's
            ``destinationBucket``).

    Raises:
        InputError: the manifest or a data file is not an S3 Inventory we read (the message names the file).
    """
    try:
        spec = json.loads(storage.read_text(manifest))
        file_format, files = spec["fileFormat"], [f["key"] for f in spec["files"]]
        bucket = spec["destinationBucket"].rsplit(":", 1)[-1]  # arn:aws:s3:::<bucket>
        schema = spec.get("fileSchema", "")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{manifest}: not an S3 Inventory manifest (fileFormat, files[].key and "
                         f"destinationBucket are needed; {type(exc).__name__}: {exc})") from exc
    if file_format not in ("CSV", "Parquet"):
        raise InputError(f"{manifest}: an S3 Inventory in {file_format}; CSV and Parquet are read (set the "
                         "inventory's output format to one of them)")
    task = ray.remote(_read_inventory_file).options(num_cpus=_TASK_CPUS, num_returns=2,
                                                    runtime_env={"env_vars": storage.aws_settings()})
    started, runs = time.monotonic(), []
    last = started
    results = [task.remote(f"s3://{bucket}/{key}", file_format, schema.split(",")) for key in files]
    for i, (meta, table) in enumerate(results):
        runs += [Run(table, start, rows) for _, start, rows in ray.get(meta)["runs"]]
        if time.monotonic() - last > progress_s:
            last = time.monotonic()
            _progress(f"read {i + 1:,}/{len(results):,} inventory files", sum(r.rows for r in runs), started)
    return runs
