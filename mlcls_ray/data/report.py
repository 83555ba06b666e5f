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

__all__ = ["SizeStats", "cooccurrence_png", "demo_image_jpeg", "figure_png", "histogram_png", "label_stats"]

_DEMO_MIN_WIDTH = 256  # demo images of tiny datasets are upscaled so their label strip stays readable
_DEMO_MAX_SIDE = 2048  # and large or extreme ones shrunk to this
HISTOGRAM_CLASSES = 150  # bars drawn at most
HEATMAP_CLASSES = 60  # rows and columns drawn at most


def figure_png(fig: plt.Figure, dpi: float | None = None) -> bytes:
    """A figure as PNG bytes (tight bounding box); the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", dpi=dpi)
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
    return figure_png(fig)


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
    return figure_png(fig)


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


class _Running:
    """Exact min, max and mean of values folded in batch by batch, and a histogram for their median.

    Values are binned at ``1 / scale`` and clipped to the last bin, so the median is exact to ``1 / scale`` for
    values below ``bins / scale``.
    """

    def __init__(self, bins: int, scale: int = 1):
        self.hist = np.zeros(bins, np.int64)
        self.scale = scale
        self.low, self.high, self.total, self.count = np.inf, -np.inf, 0.0, 0

    def add(self, values: np.ndarray) -> None:
        binned = np.clip(np.rint(values * self.scale).astype(np.int64), 0, len(self.hist) - 1)
        self.hist += np.bincount(binned, minlength=len(self.hist))
        self.low, self.high = min(self.low, values.min()), max(self.high, values.max())
        self.total += float(values.sum())
        self.count += len(values)

    def median(self) -> float:
        """The mean of the two middle values for an even count, as numpy's median."""
        cumulative = np.cumsum(self.hist)
        lower = int(np.searchsorted(cumulative, (self.count - 1) // 2, side="right"))
        upper = int(np.searchsorted(cumulative, self.count // 2, side="right"))
        return (lower + upper) / 2 / self.scale


class SizeStats:
    """Width, height and aspect-ratio statistics of the decoded images (after EXIF rotation), in fixed memory.

    Batches are folded into histograms as they arrive, so 100M images cost no more than 100. Medians are exact for
    sides up to 65,535 pixels and to 0.001 for aspect ratios up to 100; min, max and mean are exact.
    """

    def __init__(self):
        self.width, self.height = _Running(1 << 16), _Running(1 << 16)
        self.aspect = _Running(100_001, scale=1000)
        self.smaller_than_448 = 0

    def add(self, widths: np.ndarray, heights: np.ndarray) -> None:
        if not len(widths):
            return
        self.width.add(widths)
        self.height.add(heights)
        self.aspect.add(widths / np.maximum(heights, 1))
        self.smaller_than_448 += int(((widths < 448) | (heights < 448)).sum())

    def summary(self) -> dict:
        if not self.width.count:
            return {"count": 0}
        sides = {name: {"min": int(r.low), "median": r.median(), "mean": round(r.total / r.count, 2),
                        "max": int(r.high)} for name, r in (("width", self.width), ("height", self.height))}
        return {
            "count": self.width.count,
            **sides,
            "aspect_ratio": {"min": round(float(self.aspect.low), 3), "median": round(self.aspect.median(), 3),
                             "max": round(float(self.aspect.high), 3)},
            "smaller_than_448": self.smaller_than_448,
        }
