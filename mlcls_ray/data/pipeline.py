"""The one image Dataset: manifest rows in; decoded images, class ids and error columns out, streamed by Ray Data.

Every mode reads images through :func:`read_images`. The check keeps the error columns and the sizes and drops the
pixels; training maps its transforms over the pixels (Ray fuses the maps, so raw pixels never enter the object
store); evaluation and labeling feed batches to an actor pool.

Resources are honest: each task reserves one CPU and decodes on one thread. Other threads only wait on storage
(a bounded read-ahead), so a Ray Train job sharing the cluster gets the CPUs it was promised. A bad file never fails
the job; it becomes a row with ``error_kind`` and ``error_reason``, whatever the failure.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray

from mlcls_ray import storage
from mlcls_ray.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from mlcls_ray.data.manifest import Manifest
from mlcls_ray.data.manifest_rows import manifest_rows

__all__ = ["DEFAULT_MAX_FILE_BYTES", "fetch_files", "read_images"]

DEFAULT_MAX_FILE_BYTES = 256 << 20  # a larger file is refused by its size, before a byte is read
_READ_AHEAD = 8  # files being fetched while one decodes: hides S3 latency; bounds the bytes held per task
_BLOCKS_PER_CPU = 4  # enough blocks to balance load...
_MIN_ROWS, _MAX_ROWS = 32, 10_000  # ...yet 100M images plan 10,000 blocks, not millions
_EMPTY_IMAGE = np.zeros((0, 0, 3), np.uint8)


@functools.cache
def _io_pool() -> ThreadPoolExecutor:
    """One pool of storage threads per worker process, shared by the tasks it runs."""
    return ThreadPoolExecutor(_READ_AHEAD, thread_name_prefix="mlcls-read")


def _read_ahead(fn: Callable, items: Iterable) -> Iterator:
    """``map(fn, items)`` in order, with up to ``_READ_AHEAD`` calls running ahead on the I/O threads."""
    pending: deque[Future] = deque()
    for item in items:
        pending.append(_io_pool().submit(fn, item))
        if len(pending) >= _READ_AHEAD:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _open(fs: pafs.FileSystem, path: str) -> tuple[BinaryIO | pa.NativeFile, int]:
    """An open file and its size. Local files go through the OS: pyarrow's local filesystem refuses names that are
    not UTF-8, and a local name may be any bytes (they arrive here surrogate-escaped, as ``os.fsdecode`` gives them)."""
    if isinstance(fs, pafs.LocalFileSystem):
        f = open(path, "rb")  # closed by the caller
        return f, os.fstat(f.fileno()).st_size
    f = fs.open_input_file(path)
    return f, f.size()


def _read_file(fs: pafs.FileSystem, path: str, max_file_bytes: int) -> tuple[bytes | None, str, str]:
    """-> (data, error kind, reason); the kind is "" when the file was read. No failure of one file escapes: a key
    pyarrow cannot address (``//`` or a leading ``/`` in an S3 key raises ``ArrowInvalid``), a folder, a storage
    error, each becomes that file's error, so one odd key never fails a job (and every rerun of it)."""
    try:
        f, size = _open(fs, path)
        with f:
            if size > max_file_bytes:
                return _too_large(size, max_file_bytes)
            return f.read(), "", ""
    except FileNotFoundError:
        return None, "missing_image", "image file not found"
    except Exception as exc:  # a folder where the image should be, permissions, a storage error, an unaddressable key
        return None, "unreadable_file", f"cannot read ({type(exc).__name__}: {exc})"


def _read(fs: pafs.FileSystem, root: str, real_root: str | None, max_file_bytes: int, rel: str
          ) -> tuple[bytes | None, str, str]:
    full = f"{root}/{rel}"
    if real_root is not None and not os.path.realpath(full).startswith(real_root + os.sep):
        return None, "unsafe_path", "a symlink resolves outside the dataset root"
    return _read_file(fs, full, max_file_bytes)


def _too_large(size: int, max_file_bytes: int) -> tuple[None, str, str]:
    return None, "file_too_large", f"{size:,} bytes, over the limit of {max_file_bytes:,} (raise Global.max_file_bytes)"


def _read_uri(max_file_bytes: int, item: tuple[str | bytes, int]) -> tuple[bytes | None, str, str]:
    uri, size = os.fsdecode(item[0]), int(item[1])
    if storage.is_remote(uri):
        try:
            return storage.get_object(uri, max_file_bytes, size), "", ""
        except storage.FileTooLargeError as exc:
            return _too_large(exc.size, max_file_bytes)
        except FileNotFoundError:
            return None, "missing_image", "image file not found"
        except Exception as exc:  # a storage error, an S3 URI without a bucket
            return None, "unreadable_file", f"cannot read ({type(exc).__name__}: {exc})"
    try:
        fs, path = storage.resolve(uri)
    except Exception as exc:  # a bad scheme
        return None, "unreadable_file", str(exc)
    return _read_file(fs, path, max_file_bytes)


def fetch_files(uris: Iterable[str | bytes], max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
                sizes: Iterable[int] | None = None) -> Iterator[tuple[bytes | None, str, str]]:
    """``(data, error kind, reason)`` of each file (full URIs, any filesystem), in order, with the same read-ahead
    and size limit as :func:`read_images`; the kind is "" when the file was read, and no file's failure raises.

    An ``s3://`` object is read with one GET (:func:`mlcls_ray.storage.get_object`); ``sizes``, the sizes a listing
    gave (-1 where not known), refuse an object over the limit with no request at all. A URI may be ``bytes`` (a
    local name that is not UTF-8, exactly as the OS gave it); ``os.fsdecode`` turns it into the surrogate-escaped
    ``str`` Python's file functions take."""
    return _read_ahead(functools.partial(_read_uri, max_file_bytes),
                       zip(uris, itertools.repeat(-1) if sizes is None else sizes))


def _read_batch(batch: dict[str, np.ndarray], fs: pafs.FileSystem, root: str, image: str, max_pixels: int,
                max_file_bytes: int) -> dict[str, np.ndarray]:
    n = len(batch["index"])
    real_root = os.path.realpath(root) if isinstance(fs, pafs.LocalFileSystem) else None
    images = np.empty(n, dtype=object)
    kinds, reasons = np.full(n, "", dtype=object), np.full(n, "", dtype=object)
    sizes = np.zeros((n, 2), np.int32)  # [n, (height, width)]
    read = functools.partial(_read, fs, root, real_root, max_file_bytes)
    for i, (data, kind, reason) in enumerate(_read_ahead(read, batch["path"])):
        images[i] = _EMPTY_IMAGE if image == "rgb" else b""  # what a bad row carries
        if kind:
            kinds[i], reasons[i] = kind, reason
            continue
        if image == "bytes":
            images[i] = data
            continue
        try:
            rgb = decode_image(data, max_pixels)
        except ImageDecodeError as exc:
            kinds[i], reasons[i] = exc.kind, exc.reason
            continue
        sizes[i] = rgb.shape[:2]
        if image == "rgb":
            images[i] = rgb
    out = {
        "index": batch["index"],
        "path": batch["path"],
        "label_ids": batch["label_ids"],  # each row's class ids: labels.dense makes [n, C] where a consumer needs it
        "height": sizes[:, 0],
        "width": sizes[:, 1],
        "error_kind": kinds,
        "error_reason": reasons,
    }
    if image != "none":
        out["image"] = images
    return out


def _permute_rows(block: pa.Table) -> pa.Table:
    return block.take(np.random.default_rng().permutation(block.num_rows))


def _rows_per_block(rows: int) -> int:
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    return min(_MAX_ROWS, max(_MIN_ROWS, math.ceil(rows / (cpus * _BLOCKS_PER_CPU))))


def read_images(manifest: Manifest, root: str, *, image: Literal["rgb", "bytes", "none"] = "rgb",
                max_pixels: int = DEFAULT_MAX_PIXELS, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
                batch_size: int = 16, shuffle: bool = False, order: np.ndarray | None = None,
                stage: str | None = None) -> ray.data.Dataset:
    """Stream every image of a manifest through the one decoder, as a Ray Dataset.

    Args:
        manifest: the rows to read.
        root: the dataset root the manifest's paths are relative to (local or ``s3://``).
        image: ``"rgb"`` for decoded ``[H, W, 3]`` uint8 pixels, ``"bytes"`` for the file's bytes (the consumer
            decodes), ``"none"`` to decode and keep only the sizes (the check).
        max_pixels: images with more pixels are refused before decoding.
        max_file_bytes: files larger than this are refused before reading.
        batch_size: images decoded per batch; it bounds a task's memory (batch x decoded image size).
        shuffle: on every pass (an epoch), visit the manifest's blocks in a new random order and each block's
            rows in a new random order; only manifest rows move (at most 10,000 per block), no image.
        order: the manifest rows in the order the blocks take them (default: list order).
        stage: a folder under the run's output (:func:`mlcls_ray.data.manifest_rows.staging`) where a large
            manifest's rows are written once as Parquet and read on the workers, not put from the driver.

    Returns:
        A dataset with one row per manifest row: ``index`` (the manifest row), ``path``, ``label_ids`` (the row's
        sorted class ids; :func:`mlcls_ray.data.labels.dense` turns a batch's into ``[n, C]``), ``height`` and
        ``width`` (0 unless decoded), ``error_kind`` and ``error_reason`` ("" for a good image), and ``image`` unless
        ``image="none"`` (empty for a bad one). Rows come in no particular order.
    """
    fs, fs_root = storage.resolve(root)
    rows = manifest_rows(manifest, _rows_per_block(len(manifest)), order=order, stage=stage)
    if shuffle:
        rows = rows.randomize_block_order().map_batches(_permute_rows, batch_size=None, batch_format="pyarrow")
    return rows.map_batches(
        _read_batch,
        fn_kwargs={"fs": fs, "root": fs_root.rstrip("/"), "image": image, "max_pixels": max_pixels,
                   "max_file_bytes": max_file_bytes},
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=1,
    )
