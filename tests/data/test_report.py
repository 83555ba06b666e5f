"""Report plots and statistics: bounded for many classes, correct for a known label matrix."""

import io

import numpy as np
from PIL import Image

from mlcls_ray.data.report import cooccurrence_png, histogram_png, label_stats


def test_plots_of_3000_classes_stay_small():
    rng = np.random.default_rng(0)
    names = [f"class_{i}" for i in range(3000)]
    labels = (rng.random((500, 3000)) < 0.01).astype(np.uint8)
    for png in (cooccurrence_png(names, labels), histogram_png(names, labels[:400].sum(0), labels[400:].sum(0))):
        width, height = Image.open(io.BytesIO(png)).size
        assert width * height < 20_000_000  # ~ a 4500x4500 image at most, whatever the class count


def test_label_stats_on_a_known_matrix():
    names = ["a", "b", "c"]
    train = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0]])
    val = np.array([[0, 1, 0], [1, 0, 0]])
    stats = label_stats(names, {"train": train, "val": val})
    assert stats["class_counts"][0] == {"id": 0, "name": "a", "train": 3, "val": 1}
    assert stats["label_cardinality"]["train"]["histogram"] == {"0": 1, "1": 2, "2": 1}
    assert stats["images_without_labels"] == {"train": 1, "val": 0}
    assert stats["classes_without_images"] == {"train": ["c"], "val": ["c"]}
    # a: 3/4 in train vs 1/2 in val; b: 1/4 vs 1/2
    assert stats["class_ratio_drift"]["max_abs_diff"] == 0.25 and stats["class_ratio_drift"]["max_class"] == "a"
