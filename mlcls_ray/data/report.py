"""The check_dataset report: label statistics, the histogram and co-occurrence plots, and the demo images."""

from __future__ import annotations

import io
import textwrap

import matplotlib

matplotlib.use("Agg")  # headless: reports are written on cluster nodes with no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

__all__ = ["cooccurrence_png", "demo_image_jpeg", "histogram_png", "label_stats", "size_stats"]

_DEMO_MIN_WIDTH = 256  # demo images of tiny datasets are upscaled so their label strip stays readable
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


def cooccurrence_png(names: list[str], labels: np.ndarray) -> bytes:
    """Heatmap of P(column | row): how often class j is present when class i is, over all images.

    Past :data:`HEATMAP_CLASSES` classes only the most frequent are drawn.
    """
    y = labels.astype(np.float64)  # [N, C]
    keep = np.sort(np.argsort(-y.sum(axis=0), kind="stable")[:HEATMAP_CLASSES])
    y = y[:, keep]  # [N, K]
    both = y.T @ y  # [K, K]
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
    """The image with a red strip below it naming its labels in white (PaddleX's demo image, upscaled if tiny)."""
    img = Image.fromarray(rgb)
    if img.width < _DEMO_MIN_WIDTH:
        img = img.resize((_DEMO_MIN_WIDTH, round(img.height * _DEMO_MIN_WIDTH / img.width)), Image.BILINEAR)
    font_size = max(10, round(0.06 * img.width))
    font = ImageFont.load_default(size=font_size)
    chars_per_line = max(8, int(img.width / (0.6 * font_size)))
    lines = textwrap.wrap(", ".join(label_names) or "(no labels)", chars_per_line) or [""]
    strip = round(len(lines) * font_size * 1.3 + font_size * 0.4)
    canvas = Image.new("RGB", (img.width, img.height + strip), (200, 30, 30))
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


def label_stats(names: list[str], splits: dict[str, np.ndarray]) -> dict:
    """Per-class counts, label cardinality, unlabelled images and train/val drift, from ``{split: [N, C] 0/1}``."""
    counts = {s: y.sum(axis=0).astype(int) for s, y in splits.items()}
    stats: dict = {
        "class_counts": [
            {"id": i, "name": n, **{s: int(c[i]) for s, c in counts.items()}} for i, n in enumerate(names)
        ],
        "label_cardinality": {},
        "images_without_labels": {},
        "classes_without_images": {},
    }
    for split, y in splits.items():
        per_image = y.sum(axis=1).astype(int)  # [N]
        stats["label_cardinality"][split] = {
            **_summary(per_image),
            "histogram": {str(k): int(v) for k, v in zip(*np.unique(per_image, return_counts=True))},
        }
        stats["images_without_labels"][split] = int((per_image == 0).sum())
        stats["classes_without_images"][split] = [names[i] for i in np.flatnonzero(counts[split] == 0)]
    if {"train", "val"} <= splits.keys() and len(splits["train"]) and len(splits["val"]):
        # positive rate of each class in each split; a large gap means val does not measure what train teaches
        rate_train = counts["train"] / len(splits["train"])
        rate_val = counts["val"] / len(splits["val"])
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


def size_stats(widths: np.ndarray, heights: np.ndarray) -> dict:
    """Width, height and aspect ratio statistics of the decoded images (after EXIF rotation)."""
    if widths.size == 0:
        return {"count": 0}
    aspect = widths / np.maximum(heights, 1)
    return {
        "count": int(widths.size),
        "width": _summary(widths),
        "height": _summary(heights),
        "aspect_ratio": {"min": round(float(aspect.min()), 3), "median": round(float(np.median(aspect)), 3),
                         "max": round(float(aspect.max()), 3)},
        "smaller_than_448": int(((widths < 448) | (heights < 448)).sum()),
    }
