"""A large manifest is staged as Parquet under the output and read on the workers; a small one is put as today."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mlcls_ray.data.manifest import Manifest
from mlcls_ray.data.manifest_rows import manifest_rows, staging


def _manifest(n: int) -> Manifest:
    offsets = np.arange(n + 1, dtype=np.int64) * 2
    ids = np.stack([np.arange(n) % 7, 7 + np.arange(n) % 5], axis=1).ravel()  # row i: {i % 7, 7 + i % 5}
    return Manifest.from_csr(("train.parquet",), 5000, pa.array([f"img/{i}.jpg" for i in range(n)]),
                             np.zeros(n, np.uint8), np.arange(1, n + 1), offsets, ids)


def test_staged_rows_are_the_manifest_rows_in_the_given_order_and_are_removed_after(ray_start_2_cpus, tmp_path):
    order = np.random.default_rng(0).permutation(50)
    with staging(str(tmp_path / "out")) as stage:
        rows = manifest_rows(_manifest(50), 8, order=order, stage=stage, stage_rows=10).take_all()
        staged = sorted((tmp_path / "out").glob(".mlcls-rows-*/*.parquet"))
        assert len(staged) == 7  # 50 rows, 8 a file
        assert pq.read_table(staged[0])["index"].to_pylist() == order[:8].tolist()  # the rows in the given order
    assert sorted(r["index"] for r in rows) == list(range(50))
    for r in rows:
        i = r["index"]
        assert r["path"] == f"img/{i}.jpg" and list(r["label_ids"]) == [i % 7, 7 + i % 5]
    assert list((tmp_path / "out").iterdir()) == []


def test_a_small_manifest_is_not_staged(ray_start_2_cpus, tmp_path):
    with staging(str(tmp_path)) as stage:
        rows = manifest_rows(_manifest(20), 8, stage=stage, stage_rows=20).take_all()
        assert list(tmp_path.iterdir()) == []
    assert sorted(r["index"] for r in rows) == list(range(20))
