"""Ray Data pipelines over dataset manifests: rows of image paths in, per-image results out, streamed."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.fs as pafs
import ray

from mlcls_ray import storage
from mlcls_ray.data.images import ImageDecodeError, decode_image

__all__ = ["decode_check"]

_IO_THREADS = 8  # per task: overlaps S3 round trips, and Pillow releases the GIL while it decodes


def _check_one(fs: pafs.FileSystem, root: str, real_root: str | None, rel: str, max_pixels: int) -> tuple:
    """-> (kind, reason, width, height); kind is "" for a good image."""
    full = f"{root}/{rel}"
    if real_root is not None and not os.path.realpath(full).startswith(real_root + os.sep):
        return "unsafe_path", "a symlink resolves outside the dataset root", 0, 0
    try:
        with fs.open_input_stream(full) as f:
            data = f.read()
    except FileNotFoundError:
        return "missing_image", "image file not found", 0, 0
    except OSError as exc:  # a folder where the image should be, permissions, a storage error
        return "unreadable_file", f"cannot read ({exc})", 0, 0
    try:
        height, width = decode_image(data, max_pixels).shape[:2]
    except ImageDecodeError as exc:
        return exc.kind, exc.reason, 0, 0
    return "", "", width, height


def _check_batch(batch: dict[str, np.ndarray], fs: pafs.FileSystem, root: str, max_pixels: int) -> dict:
    real_root = os.path.realpath(root) if isinstance(fs, pafs.LocalFileSystem) else None
    with ThreadPoolExecutor(_IO_THREADS) as pool:
        results = list(pool.map(lambda rel: _check_one(fs, root, real_root, rel, max_pixels), batch["path"]))
    kinds, reasons, widths, heights = zip(*results) if results else ((), (), (), ())
    return {
        "index": batch["index"],
        "kind": np.array(kinds, dtype=object),
        "reason": np.array(reasons, dtype=object),
        "width": np.array(widths, dtype=np.int32),
        "height": np.array(heights, dtype=np.int32),
    }


def decode_check(paths: list[str], root: str, max_pixels: int, rows_per_task: int = 64) -> Iterator[dict]:
    """Read and fully decode every image below ``root`` in parallel, streaming.

    Yields numpy batches with ``index`` (position in ``paths``), ``kind``/``reason`` (empty for a good image),
    ``width`` and ``height``. Pixels never leave the tasks, so memory is bounded by the blocks in flight, not by
    the size of the dataset.
    """
    if not paths:
        return
    fs, fs_root = storage.resolve(root)
    items = [{"index": i, "path": p} for i, p in enumerate(paths)]
    ds = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / rows_per_task))
    ds = ds.map_batches(
        _check_batch,
        fn_kwargs={"fs": fs, "root": fs_root.rstrip("/"), "max_pixels": max_pixels},
        batch_size=rows_per_task,
        batch_format="numpy",
    )
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")
