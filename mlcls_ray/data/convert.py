"""COCO detection annotations -> MLClsDataset lists (``CheckDataset.convert``, ``src_dataset_type=COCO``).

Class index = the category's position when categories are sorted by id, 0-based; ``label.txt`` gets the same
index (PaddleX writes the raw COCO ids there, which breaks the check right after conversion on real COCO).
``iscrowd`` annotations count as positives: a crowd of people still means "person" is in the image, which is
also how PaddleX and the ASL/ML-Decoder COCO loaders count them. Images with no annotations are kept as all-zero
rows.

Images are looked for where PaddleX puts them (``images/<file_name>``) and where COCO 2017 does
(``images/train2017/<file_name>`` or ``train2017/<file_name>`` for ``annotations/instances_train2017.json``).
The lists are PaddleX's text lists, or with ``CheckDataset.convert.list_format=parquet`` the sparse Parquet lists
(:mod:`mlcls_ray.data.parquet_lists`) that 20,000 classes need. The annotation JSONs are only read; ``label.txt``
and the two lists are replaced together, the old ones kept as numbered ``.bak`` files, and a list in the other
format is moved aside to its ``.bak`` too, so the folder never holds both forms of a split.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa

from mlcls_ray import storage
from mlcls_ray.data.mlcls_format import LABEL_FILE, SPLITS, format_label_file, format_line, unsafe_reason
from mlcls_ray.data.parquet_lists import list_suffix, set_aside_other_form, write_parquet_list
from mlcls_ray.data.problems import Problem, ProblemSink

__all__ = ["LIST_FORMATS", "convert_coco"]

LIST_FORMATS = ("txt", "parquet")

_ANNOTATIONS = "annotations"
_IMAGES = "images"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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


def _image_dirs(rel: str) -> list[str]:
    """Folders that may hold the images of an annotation file: ``images/``, then COCO's ``images/train2017/``
    and ``train2017/`` for ``instances_train2017.json``."""
    name = rel.rsplit("/", 1)[-1][: -len(".json")]
    subset = name.split("_", 1)[1]  # instance_train -> train; instances_train2017 -> train2017
    return [_IMAGES, f"{_IMAGES}/{subset}", subset]


def _load(root: str, rel: str) -> tuple[dict | None, Problem | None]:
    try:
        data = json.loads(storage.read_bytes(storage.join(root, rel)))
    except json.JSONDecodeError as exc:
        return None, Problem("bad_annotations", rel, exc.lineno, f"not valid JSON: {exc.msg} (column {exc.colno})")
    except UnicodeDecodeError as exc:
        return None, Problem("bad_annotations", rel, None, f"not UTF-8 text (byte {exc.start:,})")
    except RecursionError:
        return None, Problem("bad_annotations", rel, None, "JSON nested too deeply to be COCO")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict)
               or not isinstance(data.get(k), list)]
    if missing:
        return None, Problem("bad_annotations", rel, None, f"not COCO: no list {', '.join(map(repr, missing))}")
    return data, None


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _categories(data: dict, rel: str) -> tuple[dict[int, str], list[Problem]]:
    cats: dict[int, str] = {}
    problems = []
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not _is_id(c.get("id")) or not isinstance(c.get("name"), str):
            problems.append(Problem("bad_annotations", rel, None,
                                    f"categories[{i}] = {c!r:.200}: needs an integer id and a name"))
        elif _CONTROL.search(c["name"]) or not c["name"].strip():
            problems.append(Problem("bad_annotations", rel, None,
                                    f"categories[{i}] has name {c['name']!r:.200}: label.txt needs a one-line name"))
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


def _images(data: dict, rel: str, problems: ProblemSink) -> dict[int, str]:
    """Image id -> file_name, for every well-formed entry; the first entry of a repeated id or file_name wins."""
    images: dict[int, str] = {}
    first: dict[int, int] = {}
    first_name: dict[str, int] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not _is_id(img.get("id")) or not isinstance(img.get("file_name"), str):
            problems.append(Problem("bad_annotations", rel, None,
                                    f"images[{i}] = {img!r:.200}: needs an integer id and a file_name"))
            continue
        name = img["file_name"]
        reason = ("file_name has a tab, newline or other control character" if _CONTROL.search(name)
                  else "empty file_name" if not name else unsafe_reason(name))
        if reason:
            problems.append(Problem("bad_annotations", rel, None, f"images[{i}] (id {img['id']}): {reason}",
                                    repr(name)[1:-1]))
        elif img["id"] in images:
            problems.append(Problem("bad_annotations", rel, None,
                                    f"images[{i}] repeats image id {img['id']} of images[{first[img['id']]}]; "
                                    "left out", name))
        elif name in first_name:
            problems.append(Problem("bad_annotations", rel, None,
                                    f"images[{i}] (id {img['id']}) repeats the file_name of images[{first_name[name]}]"
                                    "; left out", name))
        else:
            images[img["id"]], first[img["id"]], first_name[name] = name, i, i
    return images


def _list_rows(data: dict, rel: str, index: dict[int, int], on_disk: set[str], problems: ProblemSink
               ) -> list[tuple[str, list[int]]]:
    """``(path, sorted class indices)`` of each image found on disk, in image id order."""
    images = _images(data, rel, problems)
    labels: dict[int, set[int]] = {image_id: set() for image_id in images}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            problems.append(Problem("bad_annotations", rel, None, f"annotations[{i}] = {ann!r:.200}: not an object"))
            continue
        image_id, cat = ann.get("image_id"), ann.get("category_id")
        if not _is_id(image_id) or image_id not in images:
            problems.append(Problem("bad_annotations", rel, None,
                                    f"annotations[{i}] (id {ann.get('id')!r:.50}) refers to image id "
                                    f"{image_id!r:.50}, not in 'images'"))
        elif not _is_id(cat) or cat not in index:
            problems.append(Problem("bad_annotations", rel, None,
                                    f"annotations[{i}] (id {ann.get('id')!r:.50}) has category_id {cat!r:.50}, "
                                    "not in 'categories'"))
        else:
            labels[image_id].add(index[cat])
    dirs = _image_dirs(rel)
    rows = []
    for image_id in sorted(images):
        name = images[image_id]
        path = next((p for p in (f"{d}/{name}" for d in dirs) if p in on_disk), None)
        if path is None:
            problems.append(Problem("missing_image", rel, None,
                                    f"image id {image_id} is in the annotations but not in {', '.join(dirs)}/; "
                                    "left out", name))
            continue
        rows.append((path, sorted(labels[image_id])))
    return rows


def _write_list(uri: str, rows: list[tuple[str, list[int]]], num_classes: int, list_format: str) -> None:
    if list_format == "parquet":
        offsets = np.cumsum([0] + [len(ids) for _, ids in rows], dtype=np.int64)
        ids = np.array([i for _, row_ids in rows for i in row_ids], np.int32)
        write_parquet_list(uri, pa.array([path for path, _ in rows], pa.string()), offsets, ids)
        return
    lines = []
    for path, ids in rows:
        vector = [0] * num_classes
        for i in ids:
            vector[i] = 1
        lines.append(format_line(path, vector) + "\n")
    storage.write_text(uri, "".join(lines))


def _on_disk(root: str, dirs: set[str]) -> set[str]:
    return {f"{d}/{f}" for d in sorted(dirs) for f in storage.list_files(storage.join(root, d))}


def convert_coco(root: str, problems: ProblemSink, out: str | None = None, list_format: str = "txt") -> bool:
    """Write ``label.txt`` and the train and val lists (``.txt``, or ``.parquet`` with ``list_format="parquet"``)
    from the COCO annotations under ``root/annotations``.

    The lists go to ``out`` (default ``root``); their paths are relative to ``root`` either way. Returns whether the
    lists were written. Nothing is written when the annotations cannot be used (missing, not
    JSON, categories differing between train and val); bad entries and images missing on disk are reported and
    left out of the lists.
    """
    files = storage.list_files(storage.join(root, _ANNOTATIONS))
    found = {s: _find_annotation(root, s, files) for s in SPLITS}
    loaded = {s: _load(root, rel) for s, (rel, _) in found.items() if rel}
    fatal = [p for _, p in found.values() if p] + [p for _, p in loaded.values() if p]
    if not fatal:
        cats = {}
        for s in SPLITS:
            cats[s], cat_problems = _categories(loaded[s][0], found[s][0])
            fatal += cat_problems
        mismatch = _category_difference(cats["train"], cats["val"], found["train"][0], found["val"][0])
        fatal += [mismatch] if mismatch else []
    for p in fatal:
        problems.append(p)
    if fatal:
        return False

    ids = sorted(cats["train"])
    index = {cat_id: i for i, cat_id in enumerate(ids)}
    on_disk = _on_disk(root, {d for rel, _ in found.values() for d in _image_dirs(rel)})
    rows = {s: _list_rows(loaded[s][0], found[s][0], index, on_disk, problems) for s in SPLITS}
    suffix, folder = list_suffix(list_format), out or root
    label, lists = storage.join(folder, LABEL_FILE), {s: storage.join(folder, s + suffix) for s in SPLITS}
    with storage.replacing([label, *lists.values()]) as staged:
        storage.write_text(staged[label], format_label_file([cats["train"][i] for i in ids]))
        for s in SPLITS:
            _write_list(staged[lists[s]], rows[s], len(ids), list_format)
    set_aside_other_form(folder, suffix, SPLITS)
    return True
