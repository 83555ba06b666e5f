"""The review page: one self-contained static HTML file for the audit's issues or the labeling's review queue.

The page needs no server and reaches nothing outside itself, so it works opened from a local disk or an object-store
link: CSS and JS are inline, each image is embedded once as a small JPEG data URI (read with the size limit, decoded
by :func:`mlcls_ray.data.images.decode_image` with the pixel limit), and the rows are JSON that the script shows
through ``textContent`` only, so paths and class names are never markup. Its buttons download
``audit_decisions.csv`` (for ``Audit.apply``) or ``reviewed.txt`` (MLClsDataset lines to append to ``train.txt``).
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import posixpath
import re
from collections.abc import Callable
from importlib import resources
from typing import Any

import pyarrow as pa
from PIL import Image

from mlcls_ray.data.images import ImageDecodeError, decode_image
from mlcls_ray.data.mlcls_format import unsafe_reason
from mlcls_ray.data.pipeline import fetch_files

__all__ = ["ISSUE_COLUMNS", "QUEUE_COLUMNS", "review_page"]

ISSUE_COLUMNS = ("path", "list_file", "line", "class_id", "class_name", "kind", "given", "suggested", "score",
                 "threshold_positive", "threshold_negative", "quality", "rank")
QUEUE_COLUMNS = ("path", "rank", "uncertainty", "label_names", "top_class_ids", "top_class_names", "top_scores",
                 "top_thresholds")
_ALL_BOXES = 40  # a queue card shows a checkbox for every class up to this many classes, else a class picker
_JPEG_QUALITY = 80
_PLACEHOLDER = re.compile(r"__(TITLE|DATA)__")
# JSON inside <script>: "<" ends the element ("</script>", "<!--"), so it and its friends become \u escapes
_SCRIPT_SAFE = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"})


def _thumbnail(data: bytes, max_pixels: int, thumb_px: int) -> str:
    """A ``data:`` URI of the image as a JPEG whose longest side is at most ``thumb_px``."""
    img = Image.fromarray(decode_image(data, max_pixels))
    img.thumbnail((thumb_px, thumb_px), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=_JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def _thumbnails(uris: list[str], max_pixels: int, max_file_bytes: int, thumb_px: int
                ) -> tuple[dict[int, str], dict[int, str]]:
    """``({index: data URI}, {index: why there is no preview})`` for each URI."""
    images, errors = {}, {}
    for i, (data, kind, reason) in enumerate(fetch_files(uris, max_file_bytes)):
        if data is None:
            errors[i] = f"{kind}: {reason}"
            continue
        try:
            images[i] = _thumbnail(data, max_pixels, thumb_px)
        except ImageDecodeError as exc:
            errors[i] = f"{exc.kind}: {exc.reason}"
    return images, errors


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: a score that is not a number is shown as n/a."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _line_path(path: str, prefix: str, root: str) -> tuple[str | None, str]:
    """The path a ``reviewed.txt`` line gives an image: ``prefix`` + its path under ``root`` (its file name when it
    is not under ``root``), or ``(None, reason)`` when no list line can hold it."""
    root = root.rstrip("/")
    rel = path[len(root) + 1:] if root and path.startswith(root + "/") else posixpath.basename(path)
    line_path = prefix + rel
    if any(c in line_path for c in "\t\r\n"):
        return None, f"{line_path!r} holds a tab or line break"
    reason = unsafe_reason(line_path)
    return (None, f"{line_path!r}: {reason}") if reason else (line_path, "")


def _json(data: dict) -> str:
    return json.dumps(data, ensure_ascii=True, allow_nan=False, separators=(",", ":"))


def _queue_item(row: dict, name_ids: dict[str, int], prefix: str, root: str) -> dict:
    unknown = [n for n in row["label_names"] if n not in name_ids]
    if unknown:
        raise ValueError(f"review queue row {row['path']!r}: label_names {unknown} are not among the {len(name_ids)} "
                         "class names given (pass the names the labels were predicted with)")
    line_path, line_error = _line_path(row["path"], prefix, root)
    return {**row, "label_ids": [name_ids[n] for n in row["label_names"]], "line_path": line_path,
            "line_error": line_error}


def review_page(kind: str, rows: pa.Table, image_uri: Callable[[str], str], names: list[str], *, title: str,
                max_pixels: int, max_file_bytes: int, queue_prefix: str = "images/", queue_root: str = "",
                thumb_px: int = 128) -> str:
    """The whole review page as HTML text (the caller writes it, e.g. with ``storage.write_text``).

    Args:
        kind: ``"issues"`` (rows of the audit's ``issues.parquet``: a card per issue, Accept/Reject, download
            ``audit_decisions.csv``) or ``"queue"`` (rows of the labeling's ``review.parquet``: a card per image,
            a checkbox per class, prechecked with its ``label_names``, download ``reviewed.txt``).
        rows: the rows to show, in the order shown; the caller cuts them to the review limit.
        image_uri: a row's ``path`` -> a URI :mod:`mlcls_ray.storage` reads.
        names: every class name, indexed by class id (a queue line's label vector has ``len(names)`` values).
        title: the page's heading.
        max_pixels: images with more pixels are not decoded (their card says why).
        max_file_bytes: files larger than this are not read (their card says why).
        queue_prefix: a ``reviewed.txt`` line's path is ``queue_prefix`` + the image's path under ``queue_root``
            (its file name when it is not under it).
        queue_root: see ``queue_prefix``.
        thumb_px: the longest side of a thumbnail, in pixels; with one JPEG per distinct image this bounds the page.

    Raises:
        ValueError: an unknown kind, missing columns, or a queue label that is not in ``names``.
    """
    columns = {"issues": ISSUE_COLUMNS, "queue": QUEUE_COLUMNS}.get(kind)
    if columns is None:
        raise ValueError(f"review_page kind {kind!r}: use 'issues' or 'queue'")
    missing = [c for c in columns if c not in rows.column_names]
    if missing:
        raise ValueError(f"review_page kind {kind!r}: rows lack the columns {missing} (have {rows.column_names})")
    records = [{k: _finite(v) for k, v in r.items()} for r in rows.select(list(columns)).to_pylist()]
    if kind == "queue":
        name_ids = {}
        for i, name in enumerate(names):
            name_ids.setdefault(name, i)
        records = [_queue_item(r, name_ids, queue_prefix, queue_root) for r in records]
    uris = [image_uri(r["path"]) for r in records]
    distinct = list(dict.fromkeys(uris))  # an image with several issues is embedded once
    image_of = {uri: i for i, uri in enumerate(distinct)}
    images, errors = _thumbnails(distinct, max_pixels, max_file_bytes, thumb_px)
    items = [{**r, "image": image_of[uri]} for r, uri in zip(records, uris)]
    data = {"kind": kind, "names": list(names) if kind == "queue" else [], "all_boxes": _ALL_BOXES, "items": items,
            "images": images, "errors": errors}
    # decisions kept in the browser are filed under the page's content, so another page never picks them up
    data["key"] = hashlib.sha256(_json(data).encode()).hexdigest()[:16]
    values = {"TITLE": html.escape(title), "DATA": _json(data).translate(_SCRIPT_SAFE)}
    template = resources.files(__package__).joinpath("review_page.html").read_text("utf-8")
    return _PLACEHOLDER.sub(lambda m: values[m[1]], template)
