"""A manifest's rows as a Ray Dataset: from the driver when small, staged once as Parquet under the output when large.

``ray.data.from_arrow`` puts every block from the driver, so they live in the driver node's object store for the
whole run: about 7 GB for 100M rows of paths and ids, on the one node that also runs the driver. A manifest over
:data:`STAGE_ROWS` rows is written instead, block by block, as Parquet files in a folder under the run's output
(local, shared or ``s3://``, which every node can read), and Ray Data reads them in tasks on the workers. The folder
is removed when the run ends (:func:`staging`).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from mlcls_ray import storage
from mlcls_ray.data.manifest import Manifest

__all__ = ["STAGE_ROWS", "manifest_rows", "staging"]

STAGE_ROWS = 1_000_000  # larger manifests are staged as Parquet rather than put from the driver


@contextlib.contextmanager
def staging(output: str) -> Iterator[str]:
    """A fresh folder under ``output`` for staged manifest rows, removed (with what it holds) on exit."""
    folder = storage.join(output, f".mlcls-rows-{uuid.uuid4().hex[:12]}")
    try:
        yield folder
    finally:
        with contextlib.suppress(storage.StorageError):
            storage.delete_dir(folder)


def _block(manifest: Manifest, rows: np.ndarray) -> pa.Table:
    """``index`` (the manifest row), ``path`` and ``label_ids`` of some rows, in their order."""
    (block,) = manifest.select(rows).to_blocks(max(len(rows), 1))
    return block.set_column(0, "index", pa.array(rows, pa.int64()))


def manifest_rows(manifest: Manifest, rows_per_block: int, *, order: np.ndarray | None = None,
                  stage: str | None = None, stage_rows: int = STAGE_ROWS) -> ray.data.Dataset:
    """Rows ``index``, ``path``, ``label_ids`` of a manifest, ``rows_per_block`` a block.

    Args:
        manifest: the rows.
        rows_per_block: rows a block (and a staged file) holds.
        order: the manifest rows in the order the blocks take them (default: list order); only a block's
            worth is copied at a time.
        stage: a folder (from :func:`staging`) to write the blocks to when the manifest has more than
            ``stage_rows`` rows; None keeps them in the object store.
        stage_rows: the size from which a manifest is staged.
    """
    rows = np.arange(len(manifest), dtype=np.int64) if order is None else np.asarray(order, np.int64)
    chunks = [rows[a:a + rows_per_block] for a in range(0, len(rows), rows_per_block)]
    if stage is None or len(rows) <= stage_rows:
        return ray.data.from_arrow([_block(manifest, chunk) for chunk in chunks])
    for k, chunk in enumerate(chunks):
        with storage.open_output(storage.join(stage, f"rows-{k:06d}.parquet")) as f:
            pq.write_table(_block(manifest, chunk), f)
    fs, path = storage.resolve(stage)
    return ray.data.read_parquet(path, filesystem=fs, override_num_blocks=len(chunks))
