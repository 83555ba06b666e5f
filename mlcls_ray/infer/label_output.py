"""The layout of a label output folder: the shard plan, the part files, and what a rerun still has to do.

``_plan/shard-<N>.parquet`` holds the input listed once into shards (``shard``, ``path``) and
``_plan/_COMPLETE.json`` marks the listing complete. ``part-<shard>-<id>-n<rows>.parquet`` holds labeled rows of one
shard; its name carries its row count, so what is done is known from a listing, without opening a file.
"""

from __future__ import annotations

import collections
import json
import re
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from mlcls_ray import storage
from mlcls_ray.infer.inputs import IMAGE_EXTENSIONS, iter_inputs

__all__ = ["PLAN_DIR", "PROGRESS_S", "LabelSetupError", "Parts", "failures_in", "list_parts", "load_plan",
           "missing_rows", "part_name", "planned_rows", "read_parquet", "remaining_rows", "shard_uri"]

PLAN_DIR = "_plan"
_PLAN_DONE = "_COMPLETE.json"
_PART = re.compile(r"part-(\d+)-[0-9a-f]{8}-n(\d+)\.parquet")
PROGRESS_S = 10.0  # seconds between progress lines, while listing and while labeling
Parts = dict[int, list[tuple[str, int]]]  # shard -> [(part file name, rows), ...]


class LabelSetupError(ValueError):
    """The labeling run cannot start as configured; the message says what to change."""


def shard_uri(output: str, shard: int) -> str:
    return storage.join(output, PLAN_DIR, f"shard-{shard:06d}.parquet")


def _write_plan_shard(output: str, shard: int, paths: list[str]) -> None:
    table = pa.table({"shard": pa.array(np.full(len(paths), shard, np.int32)), "path": pa.array(paths, pa.string())})
    with storage.open_output(shard_uri(output, shard)) as f:
        pq.write_table(table, f)


def load_plan(source: str, output: str, shard_size: int) -> dict:
    """List the input once into shards under ``_plan/``, or read back the plan an earlier run completed."""
    marker = storage.join(output, PLAN_DIR, _PLAN_DONE)
    if storage.exists(marker):
        plan = json.loads(storage.read_text(marker))
        if plan["input"] != source:
            raise LabelSetupError(f"Label.output {output} holds the labels of {plan['input']}, not of {source}; "
                                  "use another Label.output")
        if plan["shard_size"] != shard_size:
            print(f"mlcls: {output} was planned with Label.shard_size={plan['shard_size']}; resuming with that")
        return plan
    shards, images, paths = 0, 0, []
    started = last = time.monotonic()
    for uri, _ in iter_inputs(source):
        paths.append(uri)
        if len(paths) == shard_size:
            _write_plan_shard(output, shards, paths)
            shards, images, paths = shards + 1, images + len(paths), []
            if time.monotonic() - last > PROGRESS_S:
                last = time.monotonic()
                print(f"[Label] listed {images:,} images ({images / (last - started):,.0f}/s)")
    if paths:
        _write_plan_shard(output, shards, paths)
        shards, images = shards + 1, images + len(paths)
    if not images:
        raise LabelSetupError(f"Label.input {source}: no images found (extensions {', '.join(IMAGE_EXTENSIONS)})")
    plan = {"input": source, "shard_size": shard_size, "images": images, "shards": shards}
    storage.write_text(marker, json.dumps(plan, indent=2) + "\n")
    print(f"[Label] listed {images:,} images of {source} into {shards:,} shard(s)")
    return plan


def planned_rows(plan: dict, shard: int) -> int:
    last = plan["images"] - plan["shard_size"] * (plan["shards"] - 1)
    return last if shard == plan["shards"] - 1 else plan["shard_size"]


def list_parts(output: str) -> Parts:
    """``{shard: [(part file name, rows), ...]}`` of the part files in the output."""
    found: Parts = collections.defaultdict(list)
    for name in storage.list_files(output) if storage.exists(output) else []:
        match = _PART.fullmatch(name)
        if match:
            found[int(match[1])].append((name, int(match[2])))
    return found


def missing_rows(plan: dict, parts: Parts, output: str) -> dict[int, int]:
    """``{shard: rows still to label}`` for every shard not complete (a shard without parts: all its rows).

    Raises:
        LabelSetupError: a shard has more rows than its plan, as two runs writing into one output leave it.
    """
    missing = {}
    for shard in set(range(plan["shards"])) | set(parts):
        named = parts.get(shard, [])
        done, planned = sum(n for _, n in named), planned_rows(plan, shard) if shard < plan["shards"] else 0
        if done > planned:
            raise LabelSetupError(f"{output}: shard {shard} has more labeled rows than its plan "
                                  f"({', '.join(name for name, _ in named)}); was a second run writing here at the "
                                  "same time? Use another Label.output")
        if done < planned:
            missing[shard] = planned - done
    return dict(sorted(missing.items()))


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = storage.resolve(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


def remaining_rows(output: str, shard: int, parts: list[tuple[str, int]]) -> pa.Table:
    """The plan rows of a shard cut short that its part files lack (a path listed twice is labeled twice)."""
    rows = read_parquet(shard_uri(output, shard))
    done = collections.Counter()
    for name, _ in parts:
        done.update(read_parquet(storage.join(output, name), ["path"])["path"].to_pylist())
    keep = []
    for i, path in enumerate(rows["path"].to_pylist()):
        if done[path]:
            done[path] -= 1
        else:
            keep.append(i)
    return rows.take(pa.array(keep, pa.int64()))


def failures_in(output: str, parts: Parts) -> collections.Counter:
    """Failed images by kind over every part file, read a column at a time (bounded memory)."""
    fs, root = storage.resolve(output)
    files = [f"{root.rstrip('/')}/{name}" for named in parts.values() for name, _ in named]
    counts: collections.Counter = collections.Counter()
    for batch in pads.dataset(files, filesystem=fs, format="parquet").to_batches(columns=["error_kind"]):
        counts.update(k for k in batch.column(0).to_pylist() if k)
    return counts


def part_name(shard: int, rows: int) -> str:
    """A new part file's name: its shard, a random id (two writers never collide) and its row count."""
    return f"part-{shard:06d}-{uuid.uuid4().hex[:8]}-n{rows}.parquet"
