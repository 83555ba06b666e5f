"""Listing and reading for bulk labeling, on a real S3 server (moto) and a real local Ray: an ``s3://`` prefix listed
by tasks gives the sequential paginator's keys in its order, with their sizes; an S3 Inventory (CSV and Parquet)
gives its latest image objects; an object is read with one GET, and refused by its listed size with none."""

from __future__ import annotations

import gzip
import json
from urllib.parse import quote_plus

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from mlcls_ray import storage
from mlcls_ray.data.pipeline import fetch_files
from mlcls_ray.infer import label_output, listing
from mlcls_ray.infer.inputs import InputError, is_image
from tests.helpers import s3_requests

pytestmark = pytest.mark.usefixtures("ray_start_2_cpus")

TREE = ["photos/a.jpg", "photos/a/x.jpg", "photos/a/y.png", "photos/a/deep/er/z.jpg", "photos/a0.jpg",
        "photos/b/", "photos/b/c.jpg", "photos/b//d.jpg", "photos/notes.txt", "photos/été/日本.jpg",
        *(f"photos/flat/{i:03d}.jpg" for i in range(9)), "photos/flat/readme.md", "photos.jpg", "photosX/no.jpg"]


def _rows(runs: list[listing.Run]) -> list[tuple[bytes, int]]:
    tables = [t.slice(r.start, r.rows) for t, r in zip(ray.get([r.table for r in runs]), runs)]
    return [(row["path"], row["size"]) for t in tables for row in t.to_pylist()]


def _plan(output: str) -> pa.Table:
    plan = json.loads(storage.read_text(f"{output}/_plan/_COMPLETE.json"))
    return pa.concat_tables(pq.read_table(label_output.shard_uri(output, s)) for s in range(plan["shards"]))


def test_a_prefix_is_listed_by_tasks_in_the_sequential_order_with_sizes(s3_bucket, tmp_path):
    client, bucket = boto3.client("s3"), s3_bucket[len("s3://"):]
    for i, key in enumerate(TREE):
        client.put_object(Bucket=bucket, Key=key, Body=b"x" * i)
    sequential = [u for u in storage.iter_files(f"{s3_bucket}/photos") if is_image(u)]
    expected = [(f"{s3_bucket}/{k}".encode(), i) for i, k in sorted(enumerate(TREE), key=lambda e: e[1])
                if k.startswith("photos/") and is_image(k)]
    assert [p for p, _ in expected] == [u.encode() for u in sequential] and len(expected) == 17

    # two keys a request and two requests a task: the flat folder's 10 keys take a chain of three tasks
    assert _rows(listing.list_prefix(f"{s3_bucket}/photos", 60, pages=2, page_keys=2)) == expected

    out = str(tmp_path / "out")
    plan = label_output.load_plan(f"{s3_bucket}/photos", out, 5, {})
    assert (plan["images"], plan["shards"]) == (17, 4)
    table = _plan(out)
    assert list(zip(table["path"].to_pylist(), table["size"].to_pylist())) == expected
    assert table["shard"].to_pylist() == [i // 5 for i in range(17)]
    assert table["row"].to_pylist() == [i % 5 for i in range(17)]


def _inventory(s3_bucket: str, fmt: str, files: list[list[tuple]]) -> str:
    """A hand-made S3 Inventory of bucket ``src`` in ``s3_bucket``; returns its manifest's URI."""
    client, bucket = boto3.client("s3"), s3_bucket[len("s3://"):]
    columns = ["Bucket", "Key", "IsLatest", "IsDeleteMarker", "Size"]
    base, keys = "inventory/src/all/2026-12-01T01-00Z", []
    for n, rows in enumerate(files):
        if fmt == "CSV":
            lines = [",".join(f'"{v}"' for v in (b, quote_plus(k, safe="/"), str(latest).lower(),
                                                  str(marker).lower(), "" if size is None else size))
                     for b, k, latest, marker, size in rows]
            body = gzip.compress("".join(f"{line}\n" for line in lines).encode())
        else:
            sink = pa.BufferOutputStream()
            pq.write_table(pa.table({c.lower().replace("islatest", "is_latest").replace("isdeletemarker",
                                                                                        "is_delete_marker"): col
                                     for c, col in zip(columns, zip(*rows))}), sink)
            body = sink.getvalue().to_pybytes()
        keys.append(f"inventory/src/all/data/{n}.{'csv.gz' if fmt == 'CSV' else 'parquet'}")
        client.put_object(Bucket=bucket, Key=keys[-1], Body=body)
    manifest = {"sourceBucket": "src", "destinationBucket": f"arn:aws:s3:::{bucket}", "version": "2016-11-30",
                "fileFormat": fmt, "fileSchema": ", ".join(columns) if fmt == "CSV" else "message s3.inventory {}",
                "files": [{"key": k, "size": 1, "MD5checksum": "0"} for k in keys]}
    client.put_object(Bucket=bucket, Key=f"{base}/manifest.json", Body=json.dumps(manifest).encode())
    return f"{s3_bucket}/{base}/manifest.json"


@pytest.mark.parametrize("fmt", ["CSV", "Parquet"])
def test_an_s3_inventory_lists_its_latest_image_objects(s3_bucket, tmp_path, fmt):
    files = [[("src", "photos/a b.jpg", True, False, 10), ("src", "photos/c+d%.png", True, False, 20),
              ("src", "photos/notes.txt", True, False, 5)],
             [("src", "photos/old.jpg", False, False, 7), ("src", "photos/gone.jpg", True, True, None),
              ("src", "photos/été/日本.jpg", True, False, 30)]]
    out = str(tmp_path / "out")
    plan = label_output.load_plan(_inventory(s3_bucket, fmt, files), out, 2, {})
    assert (plan["images"], plan["shards"]) == (3, 2)
    table = _plan(out)
    assert list(zip(table["path"].to_pylist(), table["size"].to_pylist())) == [
        (b"s3://src/photos/a b.jpg", 10), (b"s3://src/photos/c+d%.png", 20),
        ("s3://src/photos/été/日本.jpg".encode(), 30)]


def test_a_broken_inventory_is_refused_naming_the_file(s3_bucket):
    manifest = _inventory(s3_bucket, "CSV", [[("src", "a.jpg", True, False, 1), ("src", "b.jpg", True, False, "x")]])
    with pytest.raises(InputError, match=r"data/0\.csv\.gz: not a readable S3 Inventory CSV file .*'x'"):
        listing.list_inventory(manifest, 60)
    storage.write_text(manifest, json.dumps({"fileFormat": "CSV"}))
    with pytest.raises(InputError, match=r"manifest\.json: not an S3 Inventory manifest .*destinationBucket"):
        listing.list_inventory(manifest, 60)


def test_an_object_is_read_with_one_get_and_refused_by_its_listed_size(s3_bucket, s3_server, tmp_path):
    client, bucket = boto3.client("s3"), s3_bucket[len("s3://"):]
    client.put_object(Bucket=bucket, Key="small.jpg", Body=b"s" * 100)
    client.put_object(Bucket=bucket, Key="big.jpg", Body=b"b" * 5000)
    uris = [f"{s3_bucket}/small.jpg", f"{s3_bucket}/big.jpg", f"{s3_bucket}/big.jpg", f"{s3_bucket}/none.jpg"]
    with s3_requests(s3_server, tmp_path) as seen:
        got = list(fetch_files(uris, 1000, [100, 5000, -1, -1]))
    assert [(d, k) for d, k, _ in got] == [(b"s" * 100, ""), (None, "file_too_large"), (None, "file_too_large"),
                                          (None, "missing_image")]
    assert "5,000 bytes, over the limit of 1,000" in got[1][2]
    # the listed size refused the first big.jpg with no request; the unknown one was refused by its GET's length
    assert sorted(seen) == sorted([("GET", f"/{bucket}/small.jpg"), ("GET", f"/{bucket}/big.jpg"),
                                   ("GET", f"/{bucket}/none.jpg")])
