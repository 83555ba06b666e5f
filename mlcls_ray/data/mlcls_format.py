"""PaddleX's MLClsDataset format: ``label.txt`` and the ``train.txt``/``val.txt`` lists, read and written.

Reading never stops at the first problem: each bad line becomes a :class:`Problem` with its file and line.
"""

from __future__ import annotations

import posixpath
import re
from collections import Counter
from dataclasses import dataclass

from mlcls_ray import storage
from mlcls_ray.data.problems import Problem

__all__ = [
    "LABEL_FILE",
    "SPLITS",
    "ListEntry",
    "find_duplicates",
    "format_label_file",
    "format_line",
    "parse_label_file",
    "parse_list_file",
    "read_dataset",
]

LABEL_FILE = "label.txt"
SPLITS = ("train", "val")

_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")
# "<path> <vector>" with spaces: the shortest path followed by something vector-shaped (comma-separated tokens, or a
# lone 0/1 for one class), so "a b.jpg 0, 1" splits after "b.jpg" and "a b.jpg" alone has no label field.
_SPACED = re.compile(r"^(?P<path>.*?\S)\s+(?P<vector>[^\s,]*(?:\s*,\s*[^\s,]*)+|[01])$")


@dataclass(frozen=True)
class ListEntry:
    """One image line of a list file: its path below the dataset root and its multi-hot vector."""

    path: str
    labels: tuple[int, ...]
    file: str
    line: int
    text: str


def parse_label_file(text: str, file: str = LABEL_FILE) -> tuple[list[str], list[Problem]]:
    """Parse ``"<id> <name>"`` lines. Ids must be exactly 0..N-1, each once; names may contain spaces.

    Returns the names indexed by id (``"?"`` where an id is missing) and the problems found.
    """
    problems: list[Problem] = []
    names: dict[int, str] = {}
    first_line: dict[int, int] = {}
    name_line: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        id_text, name = (line.split(None, 1) + [""])[:2]  # a space or a tab after the id; names keep inner spaces
        name = name.strip()
        if not re.fullmatch(r"-?\d+", id_text):
            problems.append(Problem("bad_label_line", file, lineno, f"expected '<int id> <name>', got {line!r}"))
            continue
        class_id = int(id_text)
        if class_id < 0:
            problems.append(Problem("label_ids", file, lineno, f"class id {class_id} is negative"))
            continue
        if not name:
            problems.append(Problem("bad_label_line", file, lineno, f"class id {class_id} has no name"))
        if class_id in names:
            problems.append(
                Problem("label_ids", file, lineno, f"class id {class_id} repeated (first at line {first_line[class_id]})")
            )
            continue
        if name and name in name_line:
            problems.append(
                Problem("label_ids", file, lineno, f"class name {name!r} repeated (first at line {name_line[name]})")
            )
        names[class_id], first_line[class_id] = name or str(class_id), lineno
        name_line.setdefault(name, lineno)
    if not names and not problems:
        problems.append(Problem("bad_label_line", file, None, "no classes defined (the file is empty)"))
    size = max(names) + 1 if names else 0
    missing = [i for i in range(size) if i not in names]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        problems.append(
            Problem("label_ids", file, None, f"ids must be exactly 0..N-1 with no gaps; missing {shown}")
        )
    return [names.get(i, "?") for i in range(size)], problems


def _unsafe_reason(path: str) -> str | None:
    if "\x00" in path:
        return "path contains a NUL byte"
    if path.startswith(("/", "\\")) or _DRIVE.match(path) or "://" in path:
        return "absolute path: paths must be relative to the dataset root"
    norm = posixpath.normpath(path)
    if norm == ".." or norm.startswith("../"):
        return "path escapes the dataset root through '..'"
    return None


def _parse_vector(field: str, num_classes: int | None) -> tuple[tuple[int, ...] | None, str | None, str | None]:
    """Returns (labels, problem kind, reason)."""
    tokens = [t.strip() for t in field.split(",")]
    bad = [(i, t) for i, t in enumerate(tokens) if t not in ("0", "1")]
    if bad:
        i, t = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        return None, "bad_value", f"label value {t!r} at position {i} is not 0 or 1{more}"
    if num_classes is not None and len(tokens) != num_classes:
        return None, "wrong_length", f"label vector has {len(tokens)} values, label.txt defines {num_classes} classes"
    return tuple(int(t) for t in tokens), None, None


def parse_list_file(text: str, file: str, num_classes: int | None) -> tuple[list[ListEntry], list[Problem]]:
    """Parse ``<path>\\t<0/1,...>`` lines (a run of spaces is accepted in place of the tab, as PaddleX's docs show).

    Blank lines are skipped. ``num_classes=None`` (no usable label.txt) skips the length check only. Paths are
    normalised (``images/./a.jpg`` -> ``images/a.jpg``) and must stay inside the dataset root.
    """
    entries: list[ListEntry] = []
    problems: list[Problem] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        if "\t" in line:
            fields = line.split("\t")
            if len(fields) > 2 and not any(f.strip() for f in fields[2:]):
                fields = fields[:2]  # trailing tabs
        else:
            match = _SPACED.match(line.strip())
            fields = [match["path"], match["vector"]] if match else [line.strip()]
        path = fields[0].strip()
        if len(fields) < 2 or not fields[1].strip():
            problems.append(Problem("no_label_field", file, lineno, "no label vector after the path", path or None))
            continue
        if len(fields) > 2:
            problems.append(
                Problem("bad_line", file, lineno, f"expected 2 tab-separated fields, found {len(fields)}", path)
            )
            continue
        unsafe = _unsafe_reason(path)
        if unsafe:
            problems.append(Problem("unsafe_path", file, lineno, unsafe, path))
            continue
        labels, kind, reason = _parse_vector(fields[1], num_classes)
        if labels is None:
            problems.append(Problem(kind, file, lineno, reason, path))
            continue
        entries.append(ListEntry(posixpath.normpath(path), labels, file, lineno, line))
    return entries, problems


def find_duplicates(entries: list[ListEntry]) -> tuple[list[ListEntry], list[Problem]]:
    """Drop repeated paths (within or across lists), keeping the first; each repeat is a problem."""
    seen: dict[str, ListEntry] = {}
    kept: list[ListEntry] = []
    problems: list[Problem] = []
    for e in entries:
        if e.path in seen:
            first = seen[e.path]
            problems.append(
                Problem("duplicate_path", e.file, e.line, f"duplicate of {first.file}:{first.line}", e.path)
            )
            continue
        seen[e.path] = e
        kept.append(e)
    return kept, problems


def format_line(path: str, labels: tuple[int, ...] | list[int]) -> str:
    return f"{path}\t{','.join(str(int(v)) for v in labels)}"


def format_label_file(names: list[str]) -> str:
    return "".join(f"{i} {name}\n" for i, name in enumerate(names))


def _read_text(root: str, file: str, problems: list[Problem]) -> str | None:
    """The file's text, or None with a problem recorded (missing, a folder, not UTF-8)."""
    uri = storage.join(root, file)
    if not storage.exists(uri):
        problems.append(Problem("missing_file", file, None, f"{file} not found in {root}"))
        return None
    try:
        data = storage.read_bytes(uri)
    except storage.StorageError as exc:
        problems.append(Problem("unreadable_file", file, None, str(exc)))
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        problems.append(Problem("unreadable_file", file, line, f"not UTF-8 text (byte {exc.start:,})"))
        return None


def _majority_length(entries: list[ListEntry], problems: list[Problem]) -> list[ListEntry]:
    """Without a usable label.txt, hold the vectors to the length most lines agree on."""
    lengths = Counter(len(e.labels) for e in entries)
    if len(lengths) <= 1:
        return entries
    common = lengths.most_common(1)[0][0]
    for e in entries:
        if len(e.labels) != common:
            problems.append(Problem("wrong_length", e.file, e.line,
                                    f"label vector has {len(e.labels)} values, most lines have {common}", e.path))
    return [e for e in entries if len(e.labels) == common]


def read_dataset(root: str) -> tuple[list[str] | None, list[ListEntry], list[Problem]]:
    """Read ``label.txt`` and the lists of an MLClsDataset (local or s3://), collecting every problem.

    Returns the class names (None when label.txt is missing or has problems, since then no name can be trusted),
    the unique, well-formed entries of all lists in order, and the problems.
    """
    problems: list[Problem] = []
    text = _read_text(root, LABEL_FILE, problems)
    names = None
    if text is not None:
        names, label_problems = parse_label_file(text)
        problems += label_problems
        names = None if label_problems else names
    entries: list[ListEntry] = []
    for split in SPLITS:
        file = f"{split}.txt"
        text = _read_text(root, file, problems)
        if text is None:
            continue
        split_entries, list_problems = parse_list_file(text, file, len(names) if names else None)
        if not split_entries and not list_problems:
            problems.append(Problem("empty_list", file, None, f"{file} lists no images"))
        entries += split_entries
        problems += list_problems
    if names is None:
        entries = _majority_length(entries, problems)
    entries, dup_problems = find_duplicates(entries)
    return names, entries, problems + dup_problems
