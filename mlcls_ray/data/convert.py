"""COCO detection annotations -> MLClsDataset lists (``CheckDataset.convert``, ``src_dataset_type=COCO``).

Class index = the category's position when categories are sorted by id, 0-based; ``label.txt`` gets the same
index (PaddleX writes the raw COCO ids there, which breaks the check right after conversion on real COCO).
``iscrowd`` annotations count as positives: a crowd of people still means "person" is in the image, which is
also how PaddleX and the ASL/ML-Decoder COCO loaders count them. Images with no annotations are kept as all-zero
rows. The annotation JSONs are only read; the lists they replace are moved to numbered ``.bak`` files first.
"""

from __future__ import annotations

import json
import re

from mlcls_ray import storage
from mlcls_ray.data.mlcls_format import LABEL_FILE, SPLITS, format_label_file, format_line
from mlcls_ray.data.problems import Problem

__all__ = ["convert_coco"]

_ANNOTATIONS = "annotations"


def _find_annotation(root: str, split: str, files: list[str]) -> tuple[str | None, Problem | None]:
    """PaddleX's ``instance_<split>.json`` first, then COCO's own ``instances_<split>*.json``."""
    if f"instance_{split}.json" in files:
        return f"{_ANNOTATIONS}/instance_{split}.json", None
    found = [f for f in files if re.fullmatch(rf"instances_{split}[^/]*\.json", f)]
    if len(found) == 1:
        return f"{_ANNOTATIONS}/{found[0]}", None
    where = f"{_ANNOTATIONS}/instance_{split}.json"
    if not found:
        return None, Problem("missing_file", where, None,
                             f"not found (nor {_ANNOTATIONS}/instances_{split}*.json) in {root}")
    return None, Problem("ambiguous_annotations", where, None,
                         f"not found, and several candidates exist: {', '.join(found)}; keep one")


def _load(root: str, rel: str) -> tuple[dict | None, Problem | None]:
    try:
        data = json.loads(storage.read_text(storage.join(root, rel)))
    except json.JSONDecodeError as exc:
        return None, Problem("bad_annotations", rel, exc.lineno, f"not valid JSON: {exc.msg} (column {exc.colno})")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict)
               or not isinstance(data.get(k), list)]
    if missing:
        return None, Problem("bad_annotations", rel, None, f"not COCO: no list {', '.join(map(repr, missing))}")
    return data, None


def _categories(data: dict, rel: str) -> tuple[dict[int, str], list[Problem]]:
    cats: dict[int, str] = {}
    problems = []
    for c in data["categories"]:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            problems.append(Problem("bad_annotations", rel, None, f"category {c!r} needs an int id and a name"))
        elif c["id"] in cats:
            problems.append(Problem("bad_annotations", rel, None, f"category id {c['id']} appears twice"))
        else:
            cats[c["id"]] = c["name"]
    return cats, problems


def _category_difference(a: dict[int, str], b: dict[int, str], rel_a: str, rel_b: str) -> Problem | None:
    if a == b:
        return None
    parts = []
    for label, x, y in ((rel_a, a, b), (rel_b, b, a)):
        only = [f"{i} {x[i]!r}" for i in sorted(x.keys() - y.keys())]
        if only:
            parts.append(f"only in {label}: {', '.join(only)}")
    renamed = [f"{i} {a[i]!r} vs {b[i]!r}" for i in sorted(a.keys() & b.keys()) if a[i] != b[i]]
    if renamed:
        parts.append(f"named differently: {', '.join(renamed)}")
    return Problem("category_mismatch", rel_b, None,
                   f"train and val must have the same categories; {'; '.join(parts)}")


def _list_lines(data: dict, rel: str, index: dict[int, int], on_disk: set[str]) -> tuple[list[str], list[Problem]]:
    problems = []
    images = {}
    for img in data["images"]:
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            problems.append(Problem("bad_annotations", rel, None, f"image entry {img!r} needs an id and a file_name"))
            continue
        images[img["id"]] = img
    labels = {image_id: [0] * len(index) for image_id in images}
    for ann in data["annotations"]:
        if not isinstance(ann, dict):
            problems.append(Problem("bad_annotations", rel, None, f"annotation {ann!r} is not an object"))
            continue
        image_id, cat = ann.get("image_id"), ann.get("category_id")
        if image_id not in images:
            problems.append(Problem("bad_annotations", rel, None,
                                    f"annotation {ann.get('id')!r} refers to image id {image_id!r}, not in 'images'"))
        elif cat not in index:
            problems.append(Problem("bad_annotations", rel, None,
                                    f"annotation {ann.get('id')!r} has category_id {cat!r}, not in 'categories'"))
        else:
            labels[image_id][index[cat]] = 1
    lines = []
    for image_id in sorted(images, key=lambda i: (isinstance(i, str), i)):
        path = f"images/{images[image_id]['file_name']}"
        if images[image_id]["file_name"] not in on_disk:
            problems.append(Problem("missing_image", rel, None,
                                    f"image id {image_id!r} is in the annotations but not on disk; left out", path))
            continue
        lines.append(format_line(path, labels[image_id]))
    return lines, problems


def convert_coco(root: str) -> tuple[list[Problem], bool]:
    """Write ``label.txt``, ``train.txt`` and ``val.txt`` from the COCO annotations under ``root/annotations``.

    Returns (problems, converted). Nothing is written when the annotations cannot be used (missing, not JSON,
    categories differing between train and val); images missing on disk are left out of the lists and reported.
    """
    files = storage.list_files(storage.join(root, _ANNOTATIONS))
    found = {s: _find_annotation(root, s, files) for s in SPLITS}
    problems = [p for _, p in found.values() if p]
    if problems:
        return problems, False
    loaded = {s: _load(root, found[s][0]) for s in SPLITS}
    problems = [p for _, p in loaded.values() if p]
    if problems:
        return problems, False
    cats = {}
    for s in SPLITS:
        cats[s], cat_problems = _categories(loaded[s][0], found[s][0])
        problems += cat_problems
    mismatch = _category_difference(cats["train"], cats["val"], found["train"][0], found["val"][0])
    if mismatch:
        problems.append(mismatch)
    if problems:
        return problems, False

    ids = sorted(cats["train"])
    index = {cat_id: i for i, cat_id in enumerate(ids)}
    on_disk = set(storage.list_files(storage.join(root, "images")))
    outputs = {LABEL_FILE: format_label_file([cats["train"][i] for i in ids])}
    for s in SPLITS:
        lines, list_problems = _list_lines(loaded[s][0], found[s][0], index, on_disk)
        outputs[f"{s}.txt"] = "".join(line + "\n" for line in lines)
        problems += list_problems
    for name, text in outputs.items():
        uri = storage.join(root, name)
        storage.backup(uri)
        storage.write_text(uri, text)
    return problems, True
