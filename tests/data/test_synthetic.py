"""Tests for the synthetic multi-label shapes dataset generator."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from mlcls_ray.data.synthetic import CLASS_NAMES, generate, main

NUM_IMAGES = 200
MIN_SIZE, MAX_SIZE = 64, 128
N = len(CLASS_NAMES)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return generate(tmp_path_factory.mktemp("synthetic") / "ds", NUM_IMAGES, seed=0, val_fraction=0.2,
                    min_size=MIN_SIZE, max_size=MAX_SIZE)


def read_split(root: pathlib.Path, split: str) -> dict[str, list[int]]:
    """Parse train.txt / val.txt into {relative image path: multi-hot vector}."""
    rows = {}
    for line in (root / f"{split}.txt").read_text(encoding="utf-8").splitlines():
        path, sep, vector = line.partition("\t")
        assert sep == "\t", line
        rows[path] = [int(v) for v in vector.split(",")]
    return rows


def all_labels(root: pathlib.Path) -> np.ndarray:
    rows = {**read_split(root, "train"), **read_split(root, "val")}
    return np.array(list(rows.values()))  # (num_images, N)


def test_writes_paddlex_and_coco_files(dataset: pathlib.Path) -> None:
    for name in ("label.txt", "train.txt", "val.txt", "annotations/instance_train.json",
                 "annotations/instance_val.json"):
        assert (dataset / name).is_file(), name
        assert (dataset / name).read_bytes().endswith(b"\n"), name
    assert (dataset / "label.txt").read_text(encoding="utf-8").splitlines() == [
        f"{i} {name}" for i, name in enumerate(CLASS_NAMES)]


@pytest.mark.parametrize("split", ["train", "val"])
def test_list_lines_point_at_valid_images(dataset: pathlib.Path, split: str) -> None:
    rows = read_split(dataset, split)
    assert rows
    for path, vector in rows.items():
        assert len(vector) == N and set(vector) <= {0, 1}, path
        with Image.open(dataset / path) as image:
            assert image.mode == "RGB"
            assert MIN_SIZE <= image.width <= MAX_SIZE and MIN_SIZE <= image.height <= MAX_SIZE


def test_split_covers_every_image_exactly_once(dataset: pathlib.Path) -> None:
    train, val = read_split(dataset, "train"), read_split(dataset, "val")
    assert len(train) + len(val) == NUM_IMAGES
    assert len(val) == round(0.2 * NUM_IMAGES)
    assert not train.keys() & val.keys()
    assert sorted(p.name for p in (dataset / "images").iterdir()) == sorted(
        pathlib.PurePosixPath(p).name for p in [*train, *val])


def test_classes_are_imbalanced_and_cooccur(dataset: pathlib.Path) -> None:
    labels = all_labels(dataset)  # (num_images, N)
    positives = labels.sum(axis=0)  # (N,)
    assert positives.min() > 0
    assert positives.max() >= 4 * positives.min()
    circle, cross = CLASS_NAMES.index("circle"), CLASS_NAMES.index("cross")
    with_cross = labels[:, cross] == 1
    assert with_cross.sum() >= 10
    assert labels[with_cross, circle].mean() >= 0.85  # P(circle | cross)


def test_some_images_have_no_shape(dataset: pathlib.Path) -> None:
    labels = all_labels(dataset)
    assert 0 < (labels.sum(axis=1) == 0).sum() < NUM_IMAGES // 10


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_annotations_match_the_lists(dataset: pathlib.Path, split: str) -> None:
    coco = json.loads((dataset / "annotations" / f"instance_{split}.json").read_text(encoding="utf-8"))
    category_ids = [c["id"] for c in coco["categories"]]
    assert category_ids == sorted(category_ids)
    assert category_ids != list(range(category_ids[0], category_ids[0] + N))  # has gaps, like real COCO
    assert [c["name"] for c in coco["categories"]] == list(CLASS_NAMES)
    index_of = {category_id: i for i, category_id in enumerate(sorted(category_ids))}

    rows = read_split(dataset, split)
    assert sorted(f"images/{image['file_name']}" for image in coco["images"]) == sorted(rows)
    images = {image["id"]: image for image in coco["images"]}
    found = {image_id: [0] * N for image_id in images}
    for annotation in coco["annotations"]:
        image = images[annotation["image_id"]]
        x, y, w, h = annotation["bbox"]
        assert w > 0 and h > 0 and annotation["iscrowd"] == 0
        assert -1 <= x and x + w <= image["width"] + 1 and -1 <= y and y + h <= image["height"] + 1
        found[annotation["image_id"]][index_of[annotation["category_id"]]] = 1
    for image_id, image in images.items():
        assert found[image_id] == rows[f"images/{image['file_name']}"], image["file_name"]
        with Image.open(dataset / "images" / image["file_name"]) as opened:
            assert opened.size == (image["width"], image["height"])


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path: pathlib.Path) -> None:
    def files(root: pathlib.Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    first, again, other = (files(generate(tmp_path / name, 30, seed=seed))
                           for name, seed in (("a", 1), ("b", 1), ("c", 2)))
    assert first == again
    assert first["train.txt"] != other["train.txt"]
    assert first["images/000000.jpg"] != other["images/000000.jpg"]


def test_refuses_non_empty_out_dir(tmp_path: pathlib.Path) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("user data", encoding="utf-8")
    with pytest.raises(ValueError, match="not an empty directory"):
        generate(tmp_path, 10)
    assert [p.name for p in tmp_path.iterdir()] == ["precious.txt"]
    assert precious.read_text(encoding="utf-8") == "user data"


def test_accepts_existing_empty_dir(tmp_path: pathlib.Path) -> None:
    assert generate(tmp_path, 5) == tmp_path
    assert len(read_split(tmp_path, "train")) + len(read_split(tmp_path, "val")) == 5


def test_cli_prints_summary(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert main([str(out), "--num-images", "20", "--seed", "3", "--val-fraction", "0.25"]) == 0
    summary = capsys.readouterr().out
    assert str(out) in summary and "20 images" in summary and "train: 15" in summary and "val: 5" in summary
