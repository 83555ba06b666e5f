"""A multi-label "digits grid" MLClsDataset built from scikit-learn's 8x8 handwritten digits.

Each image is a 2 x 2 grid of cells; each cell holds one digit (scaled up, at a random offset) or nothing, and the
image's labels are the digits it shows: ten classes, about two labels an image. A plain timm loop learns it well
from scratch in a few epochs, so a recipe that does much worse on it does not learn. It is the set of ``make demo``
and of ``jobs/bench_accuracy.py``. scikit-learn ships the digits (a test extra, which ``make`` installs).

Besides the MLClsDataset lists it writes COCO detection annotations (``annotations/instance_{train,val}.json``, a
box per digit), so the demo can start from COCO as a user coming from detection data would.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from mlcls_ray.data.mlcls_format import format_label_file, format_line

__all__ = ["generate_digits"]

_GRID = 2


def _render(rng: np.random.Generator, digits: np.ndarray, targets: np.ndarray, size: int
            ) -> tuple[np.ndarray, list[int], list[tuple[int, list[int]]]]:
    """One ``[size, size, 3]`` uint8 image, its multi-hot labels and its (digit, COCO box) pairs."""
    cell = size // _GRID
    scale = max(1, (cell * 3 // 4) // 8)  # a digit fills about three quarters of its cell
    side = 8 * scale
    canvas = np.full((size, size), rng.uniform(0, 60), np.float32)
    labels, boxes = [0] * 10, []
    for k in range(_GRID * _GRID):
        if rng.random() < 0.5:
            continue
        i = int(rng.integers(len(digits)))
        glyph = np.kron(digits[i] / 16.0, np.ones((scale, scale), np.float32)) * 255  # [side, side]
        y = k // _GRID * cell + int(rng.integers(0, cell - side + 1))
        x = k % _GRID * cell + int(rng.integers(0, cell - side + 1))
        np.maximum(canvas[y:y + side, x:x + side], glyph, out=canvas[y:y + side, x:x + side])
        labels[int(targets[i])] = 1
        boxes.append((int(targets[i]), [x, y, side, side]))
    canvas += rng.normal(0, 8, canvas.shape).astype(np.float32)
    grey = np.clip(canvas, 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2), labels, boxes


def generate_digits(out_dir: str | Path, num_train: int = 1200, num_val: int = 400, *, size: int = 64,
                    seed: int = 0) -> Path:
    """Write ``images/*.png``, ``label.txt``, ``train.txt``, ``val.txt`` and ``annotations/`` under a new ``out_dir``.

    Train and val draw from disjoint halves of the digits, so val shows handwriting the model never saw.
    The same arguments give the same files.
    """
    from sklearn.datasets import load_digits  # a test extra, not a runtime dependency

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; refusing to overwrite it")
    if size < 16:
        raise ValueError(f"size must be at least 16 px, got {size}")
    (out / "images").mkdir(parents=True)
    (out / "annotations").mkdir()
    data = load_digits()
    categories = [{"id": d + 1, "name": f"digit_{d}", "supercategory": "digit"} for d in range(10)]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data.images))
    halves = {"train": order[: len(order) // 2], "val": order[len(order) // 2:]}
    for split, count in (("train", num_train), ("val", num_val)):
        pool = halves[split]
        lines, coco = [], {"images": [], "annotations": [], "categories": categories}
        for n in range(count):
            image, labels, boxes = _render(rng, data.images[pool], data.target[pool], size)
            name = f"{split}_{n:06d}.png"
            Image.fromarray(image).save(out / "images" / name)
            lines.append(format_line(f"images/{name}", labels))
            image_id = len(coco["images"]) + 1
            coco["images"].append({"id": image_id, "file_name": name, "width": size, "height": size})
            coco["annotations"] += [{"id": len(coco["annotations"]) + j + 1, "image_id": image_id,
                                     "category_id": digit + 1, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
                                    for j, (digit, box) in enumerate(boxes)]
        (out / f"{split}.txt").write_text("".join(line + "\n" for line in lines))
        (out / "annotations" / f"instance_{split}.json").write_text(json.dumps(coco, separators=(",", ":")))
    (out / "label.txt").write_text(format_label_file([f"digit_{d}" for d in range(10)]))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mlcls_ray.data.digits OUT_DIR [--num-train N] [--num-val N] [--size PX] [--seed S]``."""
    parser = argparse.ArgumentParser(prog="python -m mlcls_ray.data.digits", description=__doc__)
    parser.add_argument("out_dir")
    parser.add_argument("--num-train", type=int, default=1200)
    parser.add_argument("--num-val", type=int, default=400)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        root = generate_digits(args.out_dir, args.num_train, args.num_val, size=args.size, seed=args.seed)
    except ValueError as error:
        parser.error(str(error))
    print(f"Wrote {args.num_train} train and {args.num_val} val images to {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
