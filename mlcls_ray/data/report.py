"""The check_dataset report: label statistics, the histogram and co-occurrence plots, and the demo images.

Everything stays bounded at 20,000 classes: every class's counts go to a CSV file, while the JSON, the plots and the
co-occurrence name the head and the tail, and co-occurrence is counted only among the most frequent classes (never
a C x C matrix).
"""

from __future__ import annotations

import csv
import io
import textwrap

import matplotlib

matplotlib.use("Agg")  # headless: reports are written on cluster nodes with no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from mlcls_ray.data.manifest import Manifest  # noqa: E402

__all__ = ["SizeStats", "class_counts_csv", "cooccurrence", "demo_image_jpeg", "figure_png", "histogram_png",
           "label_stats"]

_DEMO_MIN_WIDTH = 256  # demo images of tiny datasets are upscaled so their label strip stays readable
_DEMO_MAX_SIDE = 2048  # and large or extreme ones shrunk to this
HISTOGRAM_CLASSES = 150  # bars drawn at most: past this, the most and the least frequent halves
HEATMAP_CLASSES = 60  # rows and columns drawn at most
PAIR_CLASSES = 100  # co-occurring pairs are counted among this many of the most frequent classes
TOP_PAIRS = 20  # pairs listed
REPORT_CLASSES = 200  # classes listed one by one in the JSON at most: past this, the head and the tail


def figure_png(fig: plt.Figure, dpi: float | None = None) -> bytes:
    """A figure as PNG bytes (tight bounding box); the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def _shown(total: int, limit: int) -> str:
    return f" ({limit} most frequent of {total} classes)" if total > limit else ""


def _head_and_tail(order: np.ndarray, limit: int) -> np.ndarray:
    """The first and last ``limit // 2`` of an order, or all of it when it is no longer than ``limit``."""
    return order if len(order) <= limit else np.concatenate([order[:limit // 2], order[-(limit // 2):]])


def histogram_png(names: list[str], train: np.ndarray, val: np.ndarray) -> bytes:
    """Images per class, train and val side by side, sorted by train count (PaddleX's plot).

    Past :data:`HISTOGRAM_CLASSES` classes the most frequent half and the least frequent half are drawn, either
    side of a dashed line, so the figure stays readable and its memory bounded; ``class_counts.csv`` has every count.
    """
    order = _head_and_tail(np.argsort(-train, kind="stable"), HISTOGRAM_CLASSES)
    x = np.arange(len(order))
    fig, ax = plt.subplots(figsize=(max(8, len(order) / 5), 5), dpi=150)
    ax.bar(x - 0.2, train[order], width=0.4, label="train")
    ax.bar(x + 0.2, val[order], width=0.4, label="val")
    ax.set_xticks(x, [names[i] for i in order], rotation=90 if len(order) > 10 else 0)
    ax.set_ylabel("images")
    title = "Images per class"
    if len(names) > HISTOGRAM_CLASSES:
        ax.axvline(HISTOGRAM_CLASSES // 2 - 0.5, color="grey", linestyle="--")
        title += (f" ({HISTOGRAM_CLASSES // 2} most and {HISTOGRAM_CLASSES // 2} least frequent of {len(names):,} "
                  "classes; every count in class_counts.csv)")
    ax.set_title(title)
    ax.legend()
    return figure_png(fig)


def class_counts_csv(names: list[str], counts: dict[str, np.ndarray]) -> bytes:
    """``id,name,<split>,...``: every class's images per split, one row a class."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["id", "name", *counts])
    writer.writerows([i, n, *(int(c[i]) for c in counts.values())] for i, n in enumerate(names))
    return out.getvalue().encode()


def _pair_counts(manifest: Manifest, classes: np.ndarray) -> np.ndarray:
    """``[K, K]`` int64 images that have both classes, among ``classes``; the diagonal is each class's count.

    Every ordered pair of an image's kept ids is counted with one ``bincount``, a chunk of rows at a time: the work
    is the pairs there are, with no dense row and no BLAS (whose threads thrash on a busy driver).
    """
    k = len(classes)
    slot = np.full(manifest.num_classes, -1, np.int64)
    slot[classes] = np.arange(k)
    both = np.zeros(k * k, np.int64)
    step = 1 << 16
    for start in range(0, len(manifest), step):
        offsets, ids = manifest.label_ids(slice(start, start + step))
        kept = slot[ids]
        row = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))[kept >= 0]
        kept = kept[kept >= 0]  # [m] slots of the kept ids, row by row
        length = np.bincount(row, minlength=len(offsets) - 1)  # kept ids of each row
        first = np.cumsum(length) - length  # where each row's kept ids begin
        partners = length[row]  # [m] each kept id pairs with every kept id of its row, itself included
        begin = np.cumsum(partners) - partners
        nth = np.arange(int(partners.sum())) - np.repeat(begin, partners)
        right = kept[np.repeat(first[row], partners) + nth]
        both += np.bincount(np.repeat(kept, partners) * k + right, minlength=k * k)
    return both.reshape(k, k)


def cooccurrence(names: list[str], manifest: Manifest) -> tuple[bytes, dict]:
    """The heatmap of P(column | row) over the :data:`HEATMAP_CLASSES` most frequent classes, and the
    :data:`TOP_PAIRS` pairs of classes found together on the most images.

    Pairs are counted among the :data:`PAIR_CLASSES` most frequent classes. No pair with a rarer class can have
    more images than that class has, so the list is ``exact`` when the next class is no more frequent than the last
    pair listed.
    """
    totals = manifest.class_counts()
    by_count = np.argsort(-totals, kind="stable")
    frequent = by_count[:PAIR_CLASSES]
    both = _pair_counts(manifest, frequent)  # [K, K], classes by falling frequency
    upper = np.triu(both, 1)
    best = np.argsort(-upper, axis=None, kind="stable")[:TOP_PAIRS]
    pairs = [{"a": names[frequent[i]], "b": names[frequent[j]], "images": int(upper[i, j]),
              "p_b_given_a": round(float(upper[i, j] / both[i, i]), 4),
              "p_a_given_b": round(float(upper[i, j] / both[j, j]), 4)}
             for i, j in zip(*np.unravel_index(best, upper.shape)) if upper[i, j] > 0]
    rarer = int(totals[by_count[PAIR_CLASSES]]) if len(by_count) > PAIR_CLASSES else 0  # the next class's images
    floor = pairs[-1]["images"] if len(pairs) == TOP_PAIRS else 0
    top = {"pairs": pairs, "counted_among": f"the {len(frequent)} most frequent classes", "exact": rarer <= floor}

    heat = np.argsort(frequent[:HEATMAP_CLASSES], kind="stable")  # the most frequent, drawn in class id order
    keep, counts = frequent[heat], both[np.ix_(heat, heat)]
    cond = counts / np.maximum(np.diag(counts)[:, None], 1)
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
    return figure_png(fig), top


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
    """Per-class counts, label cardinality, unlabelled images and train/val drift, for ``{split: [N] row mask}``.

    Up to :data:`REPORT_CLASSES` classes every class is listed, in id order; past it, the most and the least
    frequent halves (``class_counts``), the largest drifts, and the first classes without images, so the report
    stays readable at 20,000 classes (:func:`class_counts_csv` has them all).
    """
    counts = {s: manifest.class_counts(rows) for s, rows in splits.items()}
    per_image_all = manifest.labels_per_image()  # [N]
    listed = np.arange(len(names))
    if len(names) > REPORT_CLASSES:
        listed = _head_and_tail(np.argsort(-sum(counts.values()), kind="stable"), REPORT_CLASSES)
    stats: dict = {
        "class_counts": [
            {"id": int(i), "name": names[i], **{s: int(c[i]) for s, c in counts.items()}} for i in listed
        ],
        "label_cardinality": {},
        "images_without_labels": {},
        "classes_without_images": {},
        "classes_without_images_count": {},
    }
    if len(names) > REPORT_CLASSES:
        stats["class_counts_shown"] = (f"the {REPORT_CLASSES // 2} most and {REPORT_CLASSES // 2} least frequent of "
                                       f"{len(names):,} classes")
    for split, rows in splits.items():
        per_image = per_image_all[rows]
        stats["label_cardinality"][split] = {
            **_summary(per_image),
            "histogram": {str(k): int(v) for k, v in enumerate(np.bincount(per_image)) if v},
        }
        stats["images_without_labels"][split] = int((per_image == 0).sum())
        missing = np.flatnonzero(counts[split] == 0)
        stats["classes_without_images"][split] = [names[i] for i in missing[:REPORT_CLASSES]]
        stats["classes_without_images_count"][split] = len(missing)
    sizes = {s: int(rows.sum()) for s, rows in splits.items()}
    if {"train", "val"} <= splits.keys() and sizes["train"] and sizes["val"]:
        # positive rate of each class in each split; a large gap means val does not measure what train teaches
        rate_train = counts["train"] / sizes["train"]
        rate_val = counts["val"] / sizes["val"]
        gap = np.abs(rate_train - rate_val)
        worst = int(np.argmax(gap)) if len(gap) else 0
        drifting = np.arange(len(names))
        if len(names) > REPORT_CLASSES:
            drifting = np.argsort(-gap, kind="stable")[:REPORT_CLASSES]
            stats["class_ratio_drift_shown"] = f"the {REPORT_CLASSES} classes that drift most, most first"
        stats["class_ratio_drift"] = {
            "max_abs_diff": round(float(gap.max()), 4) if len(gap) else 0.0,
            "max_class": names[worst] if len(gap) else None,
            "mean_abs_diff": round(float(gap.mean()), 4) if len(gap) else 0.0,
            "per_class": [
                {"name": names[i], "train_rate": round(float(rate_train[i]), 4),
                 "val_rate": round(float(rate_val[i]), 4)} for i in drifting
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
