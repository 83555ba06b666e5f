"""The check_dataset report: label statistics, the histogram and co-occurrence plots, and the demo images."""

from __future__ import annotations

import io
import textwrap

import matplotlib

matplotlib.use("Agg")  # headless: reports are written on cluster nodes with no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from mlcls_ray.data.manifest import Manifest  # noqa: E402

__all__ = ["SizeStats", "cooccurrence_png", "demo_image_jpeg", "histogram_png", "label_stats"]

_DEMO_MIN_WIDTH = 256  # demo images of tiny datasets are upscaled so their label strip stays readable
_DEMO_MAX_SIDE = 2048  # and large or extreme ones shrunk to this
HISTOGRAM_CLASSES = 150  # bars drawn at most
HEATMAP_CLASSES = 60  # rows and columns drawn at most


def _png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _shown(total: int, limit: int) -> str:
    return f" ({limit} most frequent of {total} classes)" if total > limit else ""


def histogram_png(names: list[str], train: np.ndarray, val: np.ndarray) -> bytes:
    """Images per class, train and val side by side, sorted by train count (PaddleX's plot).

    Past :data:`HISTOGRAM_CLASSES` classes only the most frequent are drawn, so the figure stays readable and its
    memory stays bounded; the JSON report has every count.
    """
    order = np.argsort(-train, kind="stable")[:HISTOGRAM_CLASSES]
    x = np.arange(len(order))
    fig, ax = plt.subplots(figsize=(max(8, len(order) / 5), 5), dpi=150)
    ax.bar(x - 0.2, train[order], width=0.4, label="train")
    ax.bar(x + 0.2, val[order], width=0.4, label="val")
    ax.set_xticks(x, [names[i] for i in order], rotation=90 if len(order) > 10 else 0)
    ax.set_ylabel("images")
    ax.set_title("Images per class" + _shown(len(names), HISTOGRAM_CLASSES))
    ax.legend()
    return _png(fig)


def cooccurrence_png(names: list[str], manifest: Manifest) -> bytes:
    """Heatmap of P(column | row): how often class j is present when class i is, over all images.

    Past :data:`HEATMAP_CLASSES` classes only the most frequent are drawn. Counted chunk by chunk.
    """
    keep = np.sort(np.argsort(-manifest.class_counts(), kind="stable")[:HEATMAP_CLASSES])
    both = np.zeros((len(keep), len(keep)), np.int64)  # [K, K]
    for y in manifest.iter_labels():
        part = y[:, keep].astype(np.float32)  # [n, K]; a chunk's counts are exact in float32
        both += np.rint(part.T @ part).astype(np.int64)
    cond = both / np.maximum(np.diag(both)[:, None], 1)
    shown = [names[i] for i in keep]
    size = max(6, len(shown) / 3)
    fig, ax = plt.subplots(figsize=(size, size), dpi=150)
    im = ax.imshow(cond, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(shown)), shown, rotation=90)
    ax.set_yticks(range(len(shown)), shown)
    ax.set_xlabel("class j")
    ax.set_ylabel("class i")
    ax.set_title("Label co-occurrence: P(j | i)" + _shown(len(names), HEATMAP_CLASSES))
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _png(fig)


def demo_image_jpeg(rgb: np.ndarray, label_names: list[str]) -> bytes:
    """The image with a red strip below it naming its labels in white (PaddleX's demo image).

    Tiny images are enlarged so the strip can be read, large ones shrunk, and no side ever passes
    :data:`_DEMO_MAX_SIDE`: a valid 100 x 26,000 image must not become a JPEG over its 65,535-pixel limit.
    """
    img = Image.fromarray(rgb)
    scale = min(max(_DEMO_MIN_WIDTH / img.width, 1.0), _DEMO_MAX_SIDE / max(img.width, img.height))
    if scale != 1.0:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    width = max(img.width, _DEMO_MIN_WIDTH)  # the strip is at least this wide, however thin the image
    font_size = max(10, round(0.06 * width))
    font = ImageFont.load_default(size=font_size)
    chars_per_line = max(8, int(width / (0.6 * font_size)))
    lines = textwrap.wrap(", ".join(label_names) or "(no labels)", chars_per_line) or [""]
    strip = round(len(lines) * font_size * 1.3 + font_size * 0.4)
    canvas = Image.new("RGB", (width, img.height + strip), (200, 30, 30))
    canvas.paste(img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((font_size * 0.3, img.height + font_size * (0.2 + 1.3 * i)), line, fill="white", font=font)
    buf = io.BytesIO()
    canvas.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _summary(values: np.ndarray) -> dict:
    if values.size == 0:
        return {}
    return {"min": int(values.min()), "median": float(np.median(values)), "mean": round(float(values.mean()), 2),
            "max": int(values.max())}


def label_stats(names: list[str], manifest: Manifest, splits: dict[str, np.ndarray]) -> dict:
    """Per-class counts, label cardinality, unlabelled images and train/val drift, for ``{split: [N] row mask}``."""
    counts = {s: manifest.class_counts(rows) for s, rows in splits.items()}
    per_image_all = manifest.labels_per_image()  # [N]
    stats: dict = {
        "class_counts": [
            {"id": i, "name": n, **{s: int(c[i]) for s, c in counts.items()}} for i, n in enumerate(names)
        ],
        "label_cardinality": {},
        "images_without_labels": {},
        "classes_without_images": {},
    }
    for split, rows in splits.items():
        per_image = per_image_all[rows]
        stats["label_cardinality"][split] = {
            **_summary(per_image),
            "histogram": {str(k): int(v) for k, v in enumerate(np.bincount(per_image)) if v},
        }
        stats["images_without_labels"][split] = int((per_image == 0).sum())
        stats["classes_without_images"][split] = [names[i] for i in np.flatnonzero(counts[split] == 0)]
    sizes = {s: int(rows.sum()) for s, rows in splits.items()}
    if {"train", "val"} <= splits.keys() and sizes["train"] and sizes["val"]:
        # positive rate of each class in each split; a large gap means val does not measure what train teaches
        rate_train = counts["train"] / sizes["train"]
        rate_val = counts["val"] / sizes["val"]
        gap = np.abs(rate_train - rate_val)
        worst = int(np.argmax(gap)) if len(gap) else 0
        stats["class_ratio_drift"] = {
            "max_abs_diff": round(float(gap.max()), 4) if len(gap) else 0.0,
            "max_class": names[worst] if len(gap) else None,
            "mean_abs_diff": round(float(gap.mean()), 4) if len(gap) else 0.0,
            "per_class": [
                {"name": n, "train_rate": round(float(rate_train[i]), 4), "val_rate": round(float(rate_val[i]), 4)}
                for i, n in enumerate(names)
            ],
        }
    return stats


class SizeStats:
    """Width, height and aspect-ratio statistics of the decoded images (after EXIF rotation), in fixed memory.

    Batches are folded into histograms as they arrive, so 100M images cost no more than 100. Medians are exact for
    sides up to 65,535 pixels and to 0.001 for aspect ratios up to 100; min, max and mean are exact.
    """

    _SIDE_BINS = 1 << 16
    _ASPECT_BINS = 100_001  # thousandths, up to 100.0

    def __init__(self):
        self.count = 0
        self.smaller_than_448 = 0
        self.sides = {"width": np.zeros(self._SIDE_BINS, np.int64), "height": np.zeros(self._SIDE_BINS, np.int64)}
        self.extremes = {"width": [np.inf, 0, 0], "height": [np.inf, 0, 0]}  # min, max, sum
        self.aspect = np.zeros(self._ASPECT_BINS, np.int64)
        self.aspect_range = [np.inf, 0.0]

    def add(self, widths: np.ndarray, heights: np.ndarray) -> None:
        if not len(widths):
            return
        self.count += len(widths)
        self.smaller_than_448 += int(((widths < 448) | (heights < 448)).sum())
        for name, values in (("width", widths), ("height", heights)):
            self.sides[name] += np.bincount(np.minimum(values, self._SIDE_BINS - 1), minlength=self._SIDE_BINS)
            low, high, total = self.extremes[name]
            self.extremes[name] = [min(low, int(values.min())), max(high, int(values.max())), total + int(values.sum())]
        aspect = widths / np.maximum(heights, 1)
        self.aspect += np.bincount(np.minimum(np.rint(aspect * 1000).astype(np.int64), self._ASPECT_BINS - 1),
                                   minlength=self._ASPECT_BINS)
        self.aspect_range = [min(self.aspect_range[0], float(aspect.min())), max(self.aspect_range[1], float(aspect.max()))]

    def summary(self) -> dict:
        if not self.count:
            return {"count": 0}
        out: dict = {"count": self.count}
        for name, hist in self.sides.items():
            low, high, total = self.extremes[name]
            out[name] = {"min": low, "median": _median(hist, self.count), "mean": round(total / self.count, 2),
                         "max": high}
        out["aspect_ratio"] = {"min": round(self.aspect_range[0], 3),
                               "median": round(_median(self.aspect, self.count) / 1000, 3),
                               "max": round(self.aspect_range[1], 3)}
        out["smaller_than_448"] = self.smaller_than_448
        return out


def _median(hist: np.ndarray, count: int) -> float:
    """The median of the values a histogram counts (the mean of the two middle ones for an even count)."""
    cumulative = np.cumsum(hist)
    lower = int(np.searchsorted(cumulative, (count - 1) // 2, side="right"))
    upper = int(np.searchsorted(cumulative, count // 2, side="right"))
    return (lower + upper) / 2
