"""Synthetic multi-label "shapes" dataset in PaddleX MLClsDataset and COCO formats, for demos and tests."""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["CLASS_NAMES", "generate", "main"]

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon")

_CLASS_INDEX = {name: i for i, name in enumerate(CLASS_NAMES)}
# Zipf-like prior P(kind i) ~ 1/(i+1)^1.3: "circle" is drawn ~15x as often as "hexagon", ~10x per image.
_KIND_PROBS = 1.0 / np.arange(1, len(CLASS_NAMES) + 1) ** 1.3  # (N,)
_KIND_PROBS /= _KIND_PROBS.sum()
# trigger -> (companion, probability): a drawn trigger brings its companion along, so the pair co-occurs.
_COMPANIONS = {
    _CLASS_INDEX["cross"]: (_CLASS_INDEX["circle"], 0.95),
    _CLASS_INDEX["ring"]: (_CLASS_INDEX["star"], 0.7),
}
_EMPTY_FRACTION = 0.03  # images with no shape at all (all-zero label vector)
_MAX_SHAPES = 4
_RADIUS = (0.12, 0.3)  # a shape's radius, as a fraction of the image's shorter side
_STRIPED_FRACTION = 0.5  # backgrounds with 2..8 stripes instead of a plain gradient
_NOISE = 30  # peak-to-peak uniform pixel noise on the background
_MIN_IMAGE_SIZE = 32  # below this the shapes are a few pixels wide and no longer recognisable
_FORMATS = {"jpg": "JPEG", "png": "PNG"}
_JPEG_QUALITY = 90  # fixed so the output is byte-identical across runs


def _unit(points: list[tuple[float, float]]) -> np.ndarray:
    """Scale a polygon so its farthest vertex is at distance 1: every shape then fits in a circle of radius r."""
    pts = np.asarray(points, dtype=np.float64)  # (k, 2)
    return pts / np.linalg.norm(pts, axis=1).max()


def _regular(n: int, phase: float = 0.0, radii: Sequence[float] = (1.0,)) -> np.ndarray:
    """Regular n-gon (or star, when `radii` alternates) as unit polygon vertices, shape (n, 2)."""
    angles = phase + 2 * np.pi * np.arange(n) / n  # (n,)
    r = np.resize(np.asarray(radii, dtype=np.float64), n)  # (n,) radii repeated cyclically
    return np.stack([r * np.cos(angles), r * np.sin(angles)], axis=1)


_ARM = 0.3  # half-width of the cross's arms, relative to its half-length
# Unit polygons for every kind except circle/ring, which are drawn as ellipses; rotated and scaled per shape.
_POLYGONS: dict[str, np.ndarray] = {
    "square": _regular(4, phase=np.pi / 4),
    "triangle": _regular(3, phase=-np.pi / 2),
    "star": _regular(10, phase=-np.pi / 2, radii=(1.0, 0.45)),
    "cross": _unit([(_ARM, 1), (_ARM, _ARM), (1, _ARM), (1, -_ARM), (_ARM, -_ARM), (_ARM, -1),
                    (-_ARM, -1), (-_ARM, -_ARM), (-1, -_ARM), (-1, _ARM), (-_ARM, _ARM), (-_ARM, 1)]),
    "diamond": _unit([(1, 0), (0, 0.6), (-1, 0), (0, -0.6)]),
    "hexagon": _regular(6),
}


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Two-colour linear gradient at a random angle, striped half the time, plus pixel noise; (H, W, 3) uint8."""
    # float32 throughout: backgrounds are the bulk of the generation time.
    angle = rng.uniform(0, 2 * np.pi)
    xs = np.arange(width, dtype=np.float32) * np.float32(np.cos(angle))  # (W,)
    ys = np.arange(height, dtype=np.float32) * np.float32(np.sin(angle))  # (H,)
    t = ys[:, None] + xs[None, :]  # (H, W) position along the gradient direction
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)  # (H, W) in [0, 1]
    if rng.random() < _STRIPED_FRACTION:
        t = 0.5 + 0.5 * np.sin(np.float32(2 * np.pi * rng.uniform(2, 8)) * t)  # (H, W) 2..8 stripes across the image
    c0, c1 = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)  # (3,) each: the two end colours
    pixels = c0 + t[..., None] * (c1 - c0)  # (H, W, 3)
    # Uniform rather than Gaussian noise: it looks the same here and is ~10x cheaper to draw.
    pixels += np.float32(_NOISE) * (rng.random(pixels.shape, dtype=np.float32) - np.float32(0.5))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _sample_kinds(rng: np.random.Generator) -> list[int]:
    """Class indices of the shapes to draw in one image (may repeat; empty for a shape-less image)."""
    if rng.random() < _EMPTY_FRACTION:
        return []
    target = int(rng.integers(1, _MAX_SHAPES + 1))
    kinds: list[int] = []
    while len(kinds) < target:
        kind = int(rng.choice(len(CLASS_NAMES), p=_KIND_PROBS))
        companion, prob = _COMPANIONS.get(kind, (None, 0.0))
        needs_companion = companion is not None and companion not in kinds
        # Redraw a trigger that leaves no room for its companion. Deciding this before the coin flip keeps
        # P(companion | trigger) at `prob`; rejecting after it would select the no-companion outcomes.
        if needs_companion and len(kinds) + 2 > _MAX_SHAPES:
            continue
        kinds.append(kind)
        if needs_companion and rng.random() < prob:
            kinds.append(companion)
    return kinds


def _draw_shapes(rng: np.random.Generator, image: Image.Image, kinds: list[int]) -> list[tuple[int, list[float]]]:
    """Draw `kinds` onto `image` in place and return (class index, COCO bbox [x, y, w, h]) per shape."""
    draw = ImageDraw.Draw(image)
    width, height = image.size
    background_mean = np.asarray(image).mean(axis=(0, 1))  # (3,)
    placed: list[tuple[float, float, float]] = []  # (cx, cy, r) of the shapes drawn so far
    shapes = []
    for kind in kinds:
        r = rng.uniform(*_RADIUS) * min(width, height)
        # A few tries to avoid heavy overlap, so a later shape rarely hides an earlier one (its label would lie).
        for _ in range(10):
            cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
            if all(math.hypot(cx - px, cy - py) > 0.7 * (r + pr) for px, py, pr in placed):
                break
        placed.append((cx, cy, r))
        # Offset every channel by 64..192 (mod 256) from the background mean, so the shape always stands out.
        colour = tuple(int(c) for c in (background_mean + rng.uniform(64, 192, size=3)) % 256)
        name = CLASS_NAMES[kind]
        if name in ("circle", "ring"):
            x0, y0, x1, y1 = cx - r, cy - r, cx + r, cy + r
            if name == "ring":
                draw.ellipse((x0, y0, x1, y1), outline=colour, width=max(2, round(r / 3)))
            else:
                draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            angle = rng.uniform(0, 2 * np.pi)
            rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])  # (2, 2)
            points = _POLYGONS[name] @ rotation.T * r + (cx, cy)  # (k, 2) image coordinates
            draw.polygon([tuple(p) for p in points.tolist()], fill=colour)
            (x0, y0), (x1, y1) = points.min(axis=0), points.max(axis=0)
        shapes.append((kind, [round(float(x0), 2), round(float(y0), 2), round(float(x1 - x0), 2),
                              round(float(y1 - y0), 2)]))
    return shapes


def _check_args(out: pathlib.Path, num_images: int, val_fraction: float, min_size: int, max_size: int,
                image_format: str) -> None:
    """Raise ValueError for arguments `generate` cannot honour, before anything is written."""
    if "://" in str(out):
        raise ValueError(f"out_dir must be a local directory, got {out}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out_dir {out} exists and is not an empty directory; refusing to overwrite it")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not _MIN_IMAGE_SIZE <= min_size <= max_size:
        raise ValueError(f"need {_MIN_IMAGE_SIZE} <= min_size <= max_size, got {min_size}, {max_size}")
    if image_format not in _FORMATS:
        raise ValueError(f"image_format must be one of {sorted(_FORMATS)}, got {image_format!r}")


def _write_text(path: pathlib.Path, lines: list[str]) -> None:
    """Write lines with '\\n' endings and a trailing newline, byte-identically on every platform."""
    path.write_bytes("".join(line + "\n" for line in lines).encode("utf-8"))


def generate(out_dir: str | os.PathLike, num_images: int = 3000, *, seed: int = 0, val_fraction: float = 0.2,
             min_size: int = 64, max_size: int = 128, image_format: str = "jpg") -> pathlib.Path:
    """Generate the synthetic shapes dataset.

    Writes `images/`, `label.txt`, `train.txt`, `val.txt` (PaddleX MLClsDataset) and
    `annotations/instance_{train,val}.json` (COCO detection, category id ``2 * i + 1`` for class ``i``).
    Classes are imbalanced (Zipf-like), "cross" nearly always comes with "circle" and "ring" often with
    "star", and ~3% of images contain no shape. The same arguments give byte-identical files.

    Args:
        out_dir: Local directory to create; it must not exist or be empty.
        num_images: Total number of images over both splits.
        seed: Seed for everything random (sizes, backgrounds, shapes, split).
        val_fraction: Fraction of images in the validation split, in [0, 1).
        min_size: Minimum image width and height in pixels (at least 32).
        max_size: Maximum image width and height in pixels.
        image_format: "jpg" (quality 90) or "png".

    Returns:
        The dataset root, `out_dir` as a Path.

    Raises:
        ValueError: If `out_dir` is non-empty or not local, or an argument is out of range.
    """
    out = pathlib.Path(out_dir)
    _check_args(out, num_images, val_fraction, min_size, max_size, image_format)
    (out / "images").mkdir(parents=True)
    (out / "annotations").mkdir()

    rng = np.random.default_rng(seed)
    is_val = np.zeros(num_images, dtype=bool)  # (num_images,)
    is_val[rng.permutation(num_images)[: round(num_images * val_fraction)]] = True
    digits = max(6, len(str(num_images - 1)))
    save_options = {"quality": _JPEG_QUALITY} if image_format == "jpg" else {}
    categories = [{"id": 2 * i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASS_NAMES)]
    lines: dict[str, list[str]] = {"train": [], "val": []}
    cocos = {split: {"images": [], "annotations": [], "categories": categories} for split in lines}
    annotation_id = 0

    for index in range(num_images):
        width, height = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
        image = Image.fromarray(_background(rng, width, height))
        shapes = _draw_shapes(rng, image, _sample_kinds(rng))
        file_name = f"{index:0{digits}d}.{image_format}"
        image.save(out / "images" / file_name, format=_FORMATS[image_format], **save_options)

        split = "val" if is_val[index] else "train"
        multi_hot = [0] * len(CLASS_NAMES)
        for kind, _ in shapes:
            multi_hot[kind] = 1
        lines[split].append(f"images/{file_name}\t{','.join(map(str, multi_hot))}")
        coco = cocos[split]
        coco["images"].append({"id": index + 1, "file_name": file_name, "width": width, "height": height})
        for kind, bbox in shapes:
            annotation_id += 1
            coco["annotations"].append({"id": annotation_id, "image_id": index + 1, "category_id": 2 * kind + 1,
                                        "bbox": bbox, "area": round(bbox[2] * bbox[3], 2), "iscrowd": 0})

    _write_text(out / "label.txt", [f"{i} {name}" for i, name in enumerate(CLASS_NAMES)])
    for split, split_lines in lines.items():
        _write_text(out / f"{split}.txt", split_lines)
        _write_text(out / "annotations" / f"instance_{split}.json", [json.dumps(cocos[split], separators=(",", ":"))])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``python -m mlcls_ray.data.synthetic OUT_DIR [options]``.

    Args:
        argv: Arguments without the program name; defaults to ``sys.argv[1:]``.

    Returns:
        Process exit status (0 on success; argparse exits with 2 on bad arguments).
    """
    parser = argparse.ArgumentParser(prog="python -m mlcls_ray.data.synthetic", description=__doc__)
    parser.add_argument("out_dir", help="local directory to create (must not exist or be empty)")
    parser.add_argument("--num-images", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--min-size", type=int, default=64)
    parser.add_argument("--max-size", type=int, default=128)
    parser.add_argument("--image-format", choices=sorted(_FORMATS), default="jpg")
    args = parser.parse_args(argv)
    try:
        root = generate(args.out_dir, args.num_images, seed=args.seed, val_fraction=args.val_fraction,
                        min_size=args.min_size, max_size=args.max_size, image_format=args.image_format)
    except ValueError as error:
        parser.error(str(error))
    train, val = (len((root / f"{split}.txt").read_text(encoding="utf-8").splitlines()) for split in ("train", "val"))
    print(f"Wrote {args.num_images} images to {root} (train: {train}, val: {val})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
