"""read_images: the one image Dataset, on a real local Ray, from local disk and from a real S3-compatible server;
fetch_files, the reader of predict and label."""

import os

import boto3
import numpy as np
import pytest

from mlcls_ray.data.images import decode_image
from mlcls_ray.data.mlcls_format import read_dataset
from mlcls_ray.data.pipeline import _rows_per_block, fetch_files, read_images
from mlcls_ray.data.problems import ProblemLog
from tests.helpers import make_mlcls, upload_tree, write_image

NAMES = ["cat", "dog", "bird"]


@pytest.fixture
def dataset(tmp_path):
    rows = [(f"images/{i}.png", [i % 2, 1, 0]) for i in range(40)]
    root = make_mlcls(tmp_path / "ds", NAMES, train=rows[:30], val=rows[30:], make_images=False)
    rng = np.random.default_rng(0)
    for i in range(40):
        write_image(root / f"images/{i}.png", size=(32 + i, 48), fmt="PNG", color=tuple(rng.integers(0, 255, 3)))
    (root / "images" / "7.png").write_bytes(b"not a png")
    (root / "images" / "12.png").unlink()
    return root


def rows_by_index(ds):
    return {int(r["index"]): r for r in ds.take_all()}


def test_every_row_carries_its_pixels_labels_or_error(ray_start_2_cpus, dataset):
    _, manifest = read_dataset(str(dataset), [])
    rows = rows_by_index(read_images(manifest, str(dataset), image="rgb"))
    assert sorted(rows) == list(range(40))
    for i, row in rows.items():
        assert row["path"] == f"images/{i}.png"
        assert row["label_ids"].tolist() == ([0, 1] if i % 2 else [1])
        if i in (7, 12):
            assert row["image"].shape == (0, 0, 3) and row["height"] == 0
            continue
        assert row["error_kind"] == "" and (row["height"], row["width"]) == (48, 32 + i)
        np.testing.assert_array_equal(row["image"], decode_image((dataset / f"images/{i}.png").read_bytes()))
    assert (rows[7]["error_kind"], rows[12]["error_kind"]) == ("not_an_image", "missing_image")


def test_bytes_mode_leaves_decoding_to_the_consumer(ray_start_2_cpus, dataset):
    _, manifest = read_dataset(str(dataset), [])
    rows = rows_by_index(read_images(manifest, str(dataset), image="bytes"))
    assert rows[3]["image"] == (dataset / "images/3.png").read_bytes()
    assert rows[7]["error_kind"] == "" and rows[12]["error_kind"] == "missing_image"


def test_the_same_rows_come_from_s3(ray_start_2_cpus, dataset, s3_bucket):
    upload_tree(dataset, f"{s3_bucket}/ds")
    _, manifest = read_dataset(f"{s3_bucket}/ds", [])
    local = rows_by_index(read_images(manifest, str(dataset), image="none"))
    remote = rows_by_index(read_images(manifest, f"{s3_bucket}/ds", image="none"))
    for i in range(40):
        assert (local[i]["error_kind"], local[i]["width"]) == (remote[i]["error_kind"], remote[i]["width"])


def test_100m_images_plan_thousands_of_blocks_not_millions(ray_start_2_cpus):
    assert 100_000_000 / _rows_per_block(100_000_000) == 10_000
    assert _rows_per_block(2_000) == 250  # 8 blocks over 2 CPUs: enough to balance the load


def test_shuffle_visits_rows_in_a_new_order_every_pass(ray_start_2_cpus, tmp_path):
    """Not only blocks: rows inside a block are reordered too, and every row still comes exactly once."""
    rows = [(f"images/{i}.png", [1, 0, 0]) for i in range(200)]
    root = make_mlcls(tmp_path / "ds", NAMES, train=rows, val=rows[:1], make_images=False)
    with ProblemLog() as problems:
        _, manifest = read_dataset(str(root), problems, files=("train.txt",))
    ds = read_images(manifest, str(root), image="none", shuffle=True)  # every file is missing: no decode cost
    orders = [[int(i) for i in ds.to_pandas()["index"]] for _ in range(2)]
    for order in orders:
        assert sorted(order) == list(range(200))
        runs = sum(b == a + 1 for a, b in zip(order, order[1:]))
        assert runs < 100, runs  # block order alone would leave about 199 of 199 neighbours in sequence
    assert orders[0] != orders[1]


def test_every_file_failure_is_that_files_error_never_the_callers(tmp_path, s3_bucket):
    """A folder, a missing file, a bad URI: an error each, in order; keys pyarrow cannot address (`//`, a leading
    `/`) are read all the same (an S3 object is one GET), and so is a local name that is not UTF-8 (bytes, or
    surrogate-escaped str)."""
    data = b"\xff\xd8 some bytes"
    bucket = s3_bucket[len("s3://"):]
    for key in ("a//b.jpg", "/lead.jpg", "a/ok b.jpg"):
        boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=data)
    raw = os.fsencode(tmp_path) + b"/caf\xe9.jpg"
    with open(raw, "wb") as f:
        f.write(data)
    uris = [f"{s3_bucket}/a//b.jpg", f"{s3_bucket}//lead.jpg", f"{s3_bucket}/a/ok b.jpg", raw, os.fsdecode(raw),
            str(tmp_path), str(tmp_path / "nope.jpg"), "ftp://x/y.jpg"]
    got = list(fetch_files(uris))
    assert [kind for _, kind, _ in got] == ["", "", "", "", "", "unreadable_file", "missing_image", "unreadable_file"]
    assert "IsADirectoryError" in got[5][2]
    assert [d for d, _, _ in got[:5]] == [data] * 5
