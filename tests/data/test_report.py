"""Report plots and statistics: bounded for many classes, correct for a known label matrix, safe for odd images."""

import io

import numpy as np
import pyarrow as pa
from PIL import Image

from mlcls_ray.data.manifest import Manifest
from mlcls_ray.data.report import (SizeStats, class_counts_csv, cooccurrence, demo_image_jpeg, histogram_png,
                                   label_stats)


def manifest_of(*splits: np.ndarray) -> Manifest:
    """A manifest whose rows come from train.txt, val.txt, ... with these dense label matrices."""
    parts = [(i, pa.array([f"images/{i}_{r}.jpg" for r in range(len(y))]), np.arange(1, len(y) + 1),
              np.packbits(np.asarray(y, np.uint8), axis=1)) for i, y in enumerate(splits)]
    return Manifest.concat(("train.txt", "val.txt")[:len(splits)], np.asarray(splits[0]).shape[1], parts)


def test_plots_of_3000_classes_stay_small():
    rng = np.random.default_rng(0)
    names = [f"class_{i}" for i in range(3000)]
    labels = (rng.random((500, 3000)) < 0.01).astype(np.uint8)
    for png in (cooccurrence(names, manifest_of(labels))[0],
                histogram_png(names, labels[:400].sum(0), labels[400:].sum(0))):
        width, height = Image.open(io.BytesIO(png)).size
        assert width * height < 20_000_000  # ~ a 4500x4500 image at most, whatever the class count


def test_label_stats_on_a_known_matrix():
    names = ["a", "b", "c"]
    train = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0]])
    val = np.array([[0, 1, 0], [1, 0, 0]])
    manifest = manifest_of(train, val)
    stats = label_stats(names, manifest, {"train": manifest.rows_of("train.txt"), "val": manifest.rows_of("val.txt")})
    assert stats["class_counts"][0] == {"id": 0, "name": "a", "train": 3, "val": 1}
    assert stats["label_cardinality"]["train"]["histogram"] == {"0": 1, "1": 2, "2": 1}
    assert stats["label_cardinality"]["train"]["median"] == 1.0 and stats["label_cardinality"]["train"]["max"] == 2
    assert stats["images_without_labels"] == {"train": 1, "val": 0}
    assert stats["classes_without_images"] == {"train": ["c"], "val": ["c"]}
    # a: 3/4 in train vs 1/2 in val; b: 1/4 vs 1/2
    assert stats["class_ratio_drift"]["max_abs_diff"] == 0.25 and stats["class_ratio_drift"]["max_class"] == "a"


def test_at_20000_classes_the_report_lists_head_and_tail_and_the_csv_every_class():
    rng = np.random.default_rng(3)
    c = 20_000
    names = [f"class_{i}" for i in range(c)]
    labels = (rng.random((300, c)) < 0.02 / np.arange(1, c + 1) ** 0.3).astype(np.uint8)  # ~6 labels an image
    manifest = manifest_of(labels[:240], labels[240:])
    assert manifest.sparse
    splits = {"train": manifest.rows_of("train.txt"), "val": manifest.rows_of("val.txt")}
    stats = label_stats(names, manifest, splits)
    listed = stats["class_counts"]
    assert len(listed) == 200 and len(stats["class_ratio_drift"]["per_class"]) == 200
    totals = labels.sum(axis=0)
    assert listed[0]["train"] + listed[0]["val"] == totals.max() and listed[-1]["train"] + listed[-1]["val"] == 0
    assert len(stats["classes_without_images"]["val"]) == 200
    assert stats["classes_without_images_count"]["val"] == int((labels[240:].sum(axis=0) == 0).sum())
    rows = class_counts_csv(names, {s: manifest.class_counts(m) for s, m in splits.items()}).decode().splitlines()
    assert rows[0] == "id,name,train,val" and len(rows) == c + 1
    assert rows[1 + 7] == f"7,class_7,{labels[:240, 7].sum()},{labels[240:, 7].sum()}"


def test_top_pairs_are_the_most_frequent_pairs():
    names = ["a", "b", "c", "d"]
    y = np.array([[1, 1, 0, 0]] * 5 + [[1, 0, 1, 0]] * 3 + [[0, 1, 1, 1]] * 2 + [[0, 0, 0, 1]])
    _, top = cooccurrence(names, manifest_of(y))
    assert top["exact"]
    assert [(p["a"], p["b"], p["images"]) for p in top["pairs"]] == [
        ("a", "b", 5), ("a", "c", 3), ("b", "c", 2), ("b", "d", 2), ("c", "d", 2)]
    assert top["pairs"][0]["p_b_given_a"] == 0.625 and top["pairs"][0]["p_a_given_b"] == round(5 / 7, 4)


def test_size_stats_match_numpy_across_batches():
    rng = np.random.default_rng(0)
    widths, heights = rng.integers(1, 5000, 1001), rng.integers(1, 5000, 1001)
    stats = SizeStats()
    for start in range(0, 1001, 97):  # folded in batch by batch, as the pipeline delivers them
        stats.add(widths[start:start + 97], heights[start:start + 97])
    summary = stats.summary()
    assert summary["count"] == 1001
    assert summary["width"] == {"min": int(widths.min()), "median": float(np.median(widths)),
                                "mean": round(float(widths.mean()), 2), "max": int(widths.max())}
    assert summary["height"]["median"] == float(np.median(heights))
    assert abs(summary["aspect_ratio"]["median"] - np.median(widths / heights)) < 0.002
    assert summary["smaller_than_448"] == int(((widths < 448) | (heights < 448)).sum())


def test_a_thin_tall_image_makes_a_demo_image_that_jpeg_can_hold():
    """100 x 26,000 is a valid image; upscaled to 256 wide it would be 66,560 tall, past JPEG's 65,535."""
    jpeg = demo_image_jpeg(np.zeros((26_000, 100, 3), np.uint8), ["circle", "star"])
    width, height = Image.open(io.BytesIO(jpeg)).size
    assert max(width, height) <= 2048 + 200 and width >= 256  # the label strip stays readable


def test_a_tiny_image_is_enlarged_for_its_label_strip():
    width, _ = Image.open(io.BytesIO(demo_image_jpeg(np.zeros((32, 40, 3), np.uint8), ["a"]))).size
    assert width == 256
