"""Test helpers that build datasets and copy them to S3 the way a user would."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3

from mlcls_ray import storage
from mlcls_ray.data.mlcls_format import format_label_file, format_line


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def upload_tree(local: Path, s3_uri: str) -> None:
    """Copy a local folder to S3 with boto3, as a user's sync would."""
    bucket, _, prefix = s3_uri[len("s3://"):].partition("/")
    client = boto3.client("s3")
    for path in sorted(local.rglob("*")):
        if path.is_file():
            key = "/".join(p for p in (prefix, path.relative_to(local).as_posix()) if p)
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())


def failing_move_onto(name: str):
    """A stand-in for ``storage._move`` that fails when a staged file would become ``name``: a fault injected
    between the files of one replacement, after the ones before it were moved."""
    real_move = storage._move

    def move(src: str, dst: str) -> None:
        if dst.endswith("/" + name) and ".partial" in src:
            raise storage.StorageError(f"{dst}: injected failure")
        real_move(src, dst)

    return move


def write_image(path: Path, size: tuple[int, int] = (40, 32), color=(200, 40, 40), fmt: str = "JPEG",
                mode: str = "RGB") -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, fmt)
    return path


def make_mlcls(root: Path, names: list[str], train: list[tuple[str, list[int]]], val: list[tuple[str, list[int]]],
               make_images: bool = True) -> Path:
    """A tiny MLClsDataset; each listed image is written as a small JPEG unless make_images is False."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "label.txt").write_text(format_label_file(names))
    for split, rows in (("train", train), ("val", val)):
        (root / f"{split}.txt").write_text("".join(format_line(p, v) + "\n" for p, v in rows))
        if make_images:
            for i, (p, _) in enumerate(rows):
                write_image(root / p, color=(20 * i % 255, 100, 150))
    return root


QUADRANT_NAMES = ["top_left", "top_right", "bottom_left", "bottom_right"]


def make_quadrants(root: Path, num_train: int, num_val: int, size: int = 32, seed: int = 0) -> Path:
    """A dataset a tiny network learns in a few epochs: class i is a bright square in quadrant i, on noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    half = size // 2
    corners = [(0, 0), (0, half), (half, 0), (half, half)]  # (row, column) of each quadrant
    rows = {"train": [], "val": []}
    for i in range(num_train + num_val):
        labels = (rng.random(4) < 0.4).astype(int)
        img = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
        for c in np.flatnonzero(labels):
            r, col = corners[c]
            img[r + 2:r + half - 2, col + 2:col + half - 2] = (230, 200, 40)
        name = f"images/{i:05d}.png"
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / name)
        rows["train" if i < num_train else "val"].append((name, labels.tolist()))
    return make_mlcls(root, QUADRANT_NAMES, rows["train"], rows["val"], make_images=False)


@contextlib.contextmanager
def s3_requests(endpoint: str, folder: Path) -> Iterator[list[tuple[str, str]]]:
    """The requests the S3 server (moto) answered inside the block, from any process, as ``(method, path)`` with the
    path URL-decoded (``/bucket/key``); filled when the block ends. moto's recorder writes them to a file in the
    current folder, so the block runs in ``folder``."""
    def call(action: str) -> bytes:
        method = "GET" if action == "download" else "POST"
        with urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/recorder/{action}-recording",
                                                           method=method)) as response:
            return response.read()

    seen: list[tuple[str, str]] = []
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        call("reset")
        call("start")
        yield seen
        call("stop")
        for line in call("download").decode().splitlines():
            entry = json.loads(line)
            seen.append((entry["method"], urllib.parse.unquote(urllib.parse.urlsplit(entry["url"]).path)))
    finally:
        call("stop")
        os.chdir(cwd)
