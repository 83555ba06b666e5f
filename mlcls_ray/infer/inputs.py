"""What ``Predict.input`` and ``Label.input`` name, as a stream of image URIs: an image, a folder, or a list file.

A folder or ``s3://`` prefix is walked recursively for image extensions; a list file (``.txt``/``.lst``) holds one
URI per line, relative ones resolved against the list's folder, so PaddleX's ``train.txt``/``val.txt`` (a path, a
tab, labels) can be labeled as they are. ``Label.input`` may also be an S3 Inventory report's ``manifest.json``,
which the label job reads in Ray tasks (:mod:`mlcls_ray.infer.listing`), as it lists an ``s3://`` prefix.

URIs are ``str``; a local name that is not UTF-8 is surrogate-escaped (``os.fsdecode``), as ``os.scandir`` gives
it, and ``os.fsencode`` gives its bytes back. Nothing is collected: 100M URIs stream through in constant memory.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator

from mlcls_ray import storage

__all__ = ["IMAGE_EXTENSIONS", "INVENTORY_MANIFEST", "LIST_EXTENSIONS", "InputError", "input_kind", "is_image",
           "iter_inputs", "printable"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".tga", ".jp2",
                    ".avif", ".qoi")
LIST_EXTENSIONS = (".txt", ".lst")
INVENTORY_MANIFEST = "manifest.json"  # an S3 Inventory report is named by its manifest
_LINE_CHUNK = 1 << 20  # bytes of a list file read at a time
_BOM = b"\xef\xbb\xbf"


class InputError(ValueError):
    """The input is missing or of no kind we read; the message says what is accepted."""


def printable(uri: str | bytes) -> str:
    """A URI as UTF-8 text, for results and Parquet: itself when it is UTF-8; a local name's bytes that are not
    are written ``\\xNN`` (Python's ``backslashreplace``), so the name reads as it is."""
    return os.fsencode(uri).decode("utf-8", "backslashreplace")


def is_image(uri: str) -> bool:
    return uri.lower().endswith(IMAGE_EXTENSIONS)


def input_kind(uri: str) -> str:
    """``folder``, ``image``, ``list`` or ``inventory`` (an S3 Inventory report's ``manifest.json``).

    Raises:
        InputError: nothing is there, or a file that is neither an image nor a list.
    """
    if storage.is_dir(uri):
        return "folder"
    if not storage.exists(uri):
        raise InputError(f"{uri}: not found (give an image, a folder or s3:// prefix, or a .txt list of images)")
    if is_image(uri):
        return "image"
    if posixpath.basename(uri) == INVENTORY_MANIFEST:
        return "inventory"
    if uri.lower().endswith(LIST_EXTENSIONS):
        return "list"
    raise InputError(f"{uri}: not an image ({', '.join(IMAGE_EXTENSIONS[:5])}, ...), a folder, or a list file "
                     f"({', '.join(LIST_EXTENSIONS)}) of image paths")


def _list_entries(uri: str) -> Iterator[tuple[int, str]]:
    """(line number, entry) of a list file, streamed; blank lines and ``#`` comments are skipped.

    An entry is the line up to its first tab, kept exactly: spaces are part of a file name, and bytes that are not
    UTF-8 come through surrogate-escaped (``os.fsdecode``), so the file they name is the file opened. Only a
    Windows line end and a leading byte-order mark are dropped.
    """
    base = posixpath.dirname(storage.absolute(uri)) if storage.is_remote(uri) else \
        os.path.dirname(storage.absolute(uri))
    with storage.open_input(uri) as f:
        rest, number = b"", 0
        while True:
            chunk = f.read(_LINE_CHUNK)
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop() if chunk else b""
            for raw in lines:
                number += 1
                if number == 1 and raw.startswith(_BOM):
                    raw = raw[len(_BOM):]
                text = os.fsdecode(raw.removesuffix(b"\r").split(b"\t", 1)[0])
                if not text.strip() or text.startswith("#"):
                    continue
                absolute = storage.is_remote(text) or text.startswith("/")
                yield number, text if absolute else storage.join(base, text)
            if not chunk:
                return


def iter_inputs(uri: str) -> Iterator[tuple[str, str]]:
    """``(image URI, where it came from)`` for every image an input names, in a stable order.

    ``where`` is the path relative to the folder for a walked folder, ``<list>:<line>`` for a list entry, and the
    file name for a single image.
    """
    kind = input_kind(uri)
    if kind == "inventory":
        raise InputError(f"{uri}: an S3 Inventory report is read by Global.mode=label; give an image, a folder or "
                         "a list file here")
    if kind == "image":
        yield uri, posixpath.basename(uri)
    elif kind == "folder":
        root = storage.absolute(uri).rstrip("/")
        for found in storage.iter_files(root):
            if is_image(found):
                yield found, found[len(root) + 1:]
    else:
        name = posixpath.basename(uri)
        for line, entry in _list_entries(uri):
            yield entry, f"{name}:{line}"
