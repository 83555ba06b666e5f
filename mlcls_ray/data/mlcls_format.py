"""PaddleX's MLClsDataset format: ``label.txt`` and the ``train.txt``/``val.txt`` lists, read and written.

Lists are read as a stream of byte chunks and parsed with numpy into a columnar :class:`Manifest`, with no Python
object per line: the common line, ``<path>\\t0,1,...`` with a clean relative path, is parsed in bulk; every other
line (spaces instead of the tab, odd paths, anything wrong) goes through the exact per-line parser, which either
accepts it or records a :class:`Problem` with its file and line. Lines end at ``\\n`` (or ``\\r\\n``) only, as in
PaddleX. Reading never stops at the first problem.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator, Sequence
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mlcls_ray import storage
from mlcls_ray.data import parquet_lists
from mlcls_ray.data.labels import ids_dtype, packed_to_csr
from mlcls_ray.data.manifest import Manifest
from mlcls_ray.data.problems import Problem, ProblemSink

__all__ = [
    "LABEL_FILE",
    "SPLITS",
    "copy_lines",
    "drop_duplicates",
    "format_label_file",
    "format_line",
    "iter_lines",
    "line_bounds",
    "parse_label_file",
    "parse_list",
    "read_dataset",
    "read_splits",
    "split_rows",
    "unsafe_reason",
]

LABEL_FILE = "label.txt"
SPLITS = ("train", "val")
_WS = " \t\r\f\v"  # what a path or value may be padded with; other characters belong to it
_CHUNK = 32 << 20  # bytes of a list parsed at a time
_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")
_BLANKS = re.compile(r"[ \t]+")
# A path the bulk parser leaves to the per-line one: padded, absolute, with a scheme or NUL, or not normalised.
ODD_PATH = r"^[ \t\r\f\v]|[ \t\r\f\v]$|^[/\\]|^[A-Za-z]:[\\/]|://|\x00|(^|/)\.\.?(/|$)|//|/$"
_LABEL_LINE = re.compile(r"(-?\d+)(?:[ \t]+(.*))?")


def parse_label_file(text: str, file: str = LABEL_FILE) -> tuple[list[str], list[Problem]]:
    """Parse ``"<id> <name>"`` lines. Ids must be exactly 0..N-1, each once; names may contain spaces.

    Returns the names indexed by id (``"?"`` where an id is missing) and the problems found.
    """
    problems: list[Problem] = []
    names: dict[int, str] = {}
    where: dict[int, int] = {}
    name_line: dict[str, int] = {}
    for lineno, raw in enumerate(text.split("\n"), 1):
        line = raw.strip(_WS)
        if not line:
            continue
        match = _LABEL_LINE.fullmatch(line)
        if not match:
            problems.append(Problem("bad_label_line", file, lineno, f"expected '<int id> <name>', got {line!r}"))
            continue
        class_id, name = int(match[1]), (match[2] or "").strip(_WS)
        if class_id < 0:
            problems.append(Problem("label_ids", file, lineno, f"class id {class_id} is negative"))
            continue
        if not name:
            problems.append(Problem("bad_label_line", file, lineno, f"class id {class_id} has no name"))
        if class_id in names:
            problems.append(Problem("label_ids", file, lineno,
                                    f"class id {class_id} repeated (first at line {where[class_id]})"))
            continue
        if name and name in name_line:
            problems.append(Problem("label_ids", file, lineno,
                                    f"class name {name!r} repeated (first at line {name_line[name]})"))
        names[class_id], where[class_id] = name or str(class_id), lineno
        name_line.setdefault(name, lineno)
    if not names and not problems:
        problems.append(Problem("bad_label_line", file, None, "no classes defined (the file is empty)"))
    size = len(names)  # never max(id) + 1: an id of 9999999999 must not size anything
    outside = sorted(i for i in names if i >= size)
    if outside:
        missing = [i for i in range(size) if i not in names]
        shown = ", ".join(f"{i} (line {where[i]})" for i in outside[:10]) + (" ..." if len(outside) > 10 else "")
        gaps = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        problems.append(Problem("label_ids", file, None, f"ids must be exactly 0..N-1 with no gaps (N = {size} "
                                                         f"classes here); out of range: {shown}; missing {gaps}"))
    return [names.get(i, "?") for i in range(size)], problems


def unsafe_reason(path: str) -> str | None:
    """Why a dataset path must not be read (absolute, a scheme, NUL, escaping through ``..``), or None."""
    if "\x00" in path:
        return "path contains a NUL byte"
    if path.startswith(("/", "\\")) or _DRIVE.match(path) or "://" in path:
        return "absolute path: paths must be relative to the dataset root"
    norm = posixpath.normpath(path)
    if norm == ".." or norm.startswith("../"):
        return "path escapes the dataset root through '..'"
    if norm == ".":
        return "path names the dataset root itself, not an image"
    return None


def _parse_vector(field: str, num_classes: int, expected: str) -> tuple[tuple[int, ...] | None, str, str]:
    """Returns (labels, problem kind, reason); labels is None when the field is not a 0/1 vector of the length."""
    tokens = [t.strip(_WS) for t in field.split(",")]
    bad = [(i, t) for i, t in enumerate(tokens) if t not in ("0", "1")]
    if bad:
        i, t = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        return None, "bad_value", f"label value {t!r} at position {i} is not 0 or 1{more}"
    if len(tokens) != num_classes:
        return None, "wrong_length", f"label vector has {len(tokens)} values, {expected}"
    return tuple(int(t) for t in tokens), "", ""


def _split_spaced(line: str) -> tuple[str, str] | None:
    """``"<path> <vector>"`` separated by spaces, as PaddleX's docs show it; None without a vector.

    The split is after the shortest path whose rest is vector-shaped (comma-separated tokens, spaces only around
    commas, or a lone 0/1), so ``a b.jpg 0, 1`` splits after ``b.jpg``. Inside a vector spaces only pad commas, so
    the split is at the last run of spaces not touching a comma, or, without one, at the first run that leaves a
    comma or a lone 0/1 after it. One pass, no backtracking, whatever the line holds.
    """
    runs = list(_BLANKS.finditer(line))
    free = [r for r in runs if line[r.start() - 1] != "," and line[r.end()] != ","]
    last_comma = line.rfind(",")
    for run in free[-1:] or runs:
        if run.end() <= last_comma or (run.end() == len(line) - 1 and line[-1] in "01"):
            return line[:run.start()], line[run.end():]
    return None


def _parse_line(line: str, lineno: int, file: str, num_classes: int, expected: str,
                problems: ProblemSink) -> tuple[str, tuple[int, ...]] | None:
    """One line the bulk parser left: ``(normalised path, labels)``, or None (blank, or a problem recorded)."""
    if not line.strip(_WS):
        return None
    if "\t" in line:
        fields = line.split("\t")
        if len(fields) > 2 and not any(f.strip(_WS) for f in fields[2:]):
            fields = fields[:2]  # trailing tabs
    else:
        fields = list(_split_spaced(line.strip(_WS)) or [line.strip(_WS)])
    path = fields[0].strip(_WS)
    if len(fields) < 2 or not fields[1].strip(_WS):
        problems.append(Problem("no_label_field", file, lineno, "no label vector after the path", path or None))
        return None
    if len(fields) > 2:
        problems.append(Problem("bad_line", file, lineno, f"expected 2 tab-separated fields, found {len(fields)}",
                                path or None))
        return None
    if not path:
        problems.append(Problem("bad_line", file, lineno, "empty path before the label vector"))
        return None
    unsafe = unsafe_reason(path)
    if unsafe:
        problems.append(Problem("unsafe_path", file, lineno, unsafe, path))
        return None
    labels, kind, reason = _parse_vector(fields[1], num_classes, expected)
    if labels is None:
        problems.append(Problem(kind, file, lineno, reason, path))
        return None
    return posixpath.normpath(path), labels


def line_bounds(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Start, end (exclusive, before any ``\r``) and line break (the ``\n``, or ``len(a)``) of each line of a chunk."""
    breaks = np.flatnonzero(a == 10)
    if len(a) and a[-1] != 10:
        breaks = np.append(breaks, len(a))  # the file's last line, without a newline
    starts = np.empty_like(breaks)
    starts[:1] = 0
    starts[1:] = breaks[:-1] + 1
    ends = breaks - ((breaks > starts) & (a[np.maximum(breaks - 1, 0)] == 13))
    return starts, ends, breaks


def _byte_mask(size: int, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """``[size]`` bool, true inside the disjoint ranges ``[starts[i], ends[i])``."""
    edges = np.zeros(size + 1, np.int8)
    edges[starts] += 1
    edges[ends] -= 1
    return np.cumsum(edges[:-1], dtype=np.int8).view(bool)  # the ranges never overlap, so the sum is 0 or 1


def _gather(a: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The disjoint, ordered byte ranges ``a[starts[i]:ends[i]]`` laid end to end, and their int32 offsets."""
    offsets = np.zeros(len(starts) + 1, np.int64)
    np.cumsum(ends - starts, out=offsets[1:])
    return a[_byte_mask(len(a), starts, ends)], offsets.astype(np.int32)


def _not_utf8(strings: pa.StringArray) -> np.ndarray:
    """``[n]`` bool: which strings are not valid UTF-8, found by halving, so one bad path costs a few checks."""
    try:
        strings.validate(full=True)
        return np.zeros(len(strings), bool)
    except pa.ArrowInvalid:
        if len(strings) == 1:
            return np.ones(1, bool)
        half = len(strings) // 2
        return np.concatenate([_not_utf8(strings.slice(0, half)), _not_utf8(strings.slice(half))])


def parse_list(data: bytes, file: str, num_classes: int, problems: ProblemSink, *, first_line: int = 1,
               expected: str | None = None) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """Parse whole lines of a list file (``<path>\\t<0/1,...>``; a run of spaces may stand for the tab).

    Args:
        data: whole lines (the last may lack its newline).
        file: the list's name, for problems.
        num_classes: the vector length every line must have.
        problems: where bad lines go.
        first_line: the line number of the first line in ``data``.
        expected: how a wrong length is explained (default: label.txt defines ``num_classes`` classes).

    Returns:
        ``(paths, line numbers, packed labels)`` of the good lines, in line order.
    """
    expected = expected or f"label.txt defines {num_classes} classes"
    a = np.frombuffer(data, np.uint8)
    starts, ends, _ = line_bounds(a)
    n = len(starts)
    tabs = np.flatnonzero(a == 9)
    tab_line = np.searchsorted(starts, tabs, side="right") - 1
    tab_at = np.zeros(n, np.int64)
    tab_at[tab_line] = tabs
    width = 2 * num_classes - 1  # "0,1,...,0"
    bulk = (np.bincount(tab_line, minlength=n) == 1) & (ends - tab_at - 1 == width) & (tab_at > starts)
    rows = np.flatnonzero(bulk)
    packed = np.zeros((0, (num_classes + 7) // 8), np.uint8)
    if len(rows) and len(a) >= width:
        vectors = np.lib.stride_tricks.sliding_window_view(a, width)[tab_at[rows] + 1]  # [m, 2C-1]
        good = (vectors[:, 1::2] == ord(",")).all(axis=1) & ((vectors[:, ::2] | 1) == ord("1")).all(axis=1)
        rows, vectors = rows[good], vectors[good]
        paths_data, offsets = _gather(a, starts[rows], tab_at[rows])
        paths = pa.StringArray.from_buffers(len(rows), pa.py_buffer(offsets), pa.py_buffer(paths_data))
        utf8 = ~_not_utf8(paths)  # a path that is not UTF-8 goes to the per-line parser, which names it
        if not utf8.all():
            rows, vectors, paths = rows[utf8], vectors[utf8], paths.filter(pa.array(utf8))
        plain = ~pc.match_substring_regex(paths, ODD_PATH).to_numpy(zero_copy_only=False)
        rows, paths = rows[plain], paths.filter(pa.array(plain))
        packed = np.packbits(vectors[plain, ::2] - ord("0"), axis=1)
    else:
        rows, paths = rows[:0], pa.array([], pa.string())
    bulk[:] = False
    bulk[rows] = True
    slow_paths, slow_lines, slow_labels = [], [], []
    for i in np.flatnonzero(~bulk):
        raw = data[starts[i]:ends[i]]
        lineno = first_line + int(i)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append(Problem("bad_line", file, lineno, f"not UTF-8 text (byte {exc.start + 1} of the line)"))
            continue
        parsed = _parse_line(text, lineno, file, num_classes, expected, problems)
        if parsed:
            slow_paths.append(parsed[0])
            slow_lines.append(lineno)
            slow_labels.append(parsed[1])
    lines = first_line + rows
    if slow_paths:
        order = np.argsort(np.concatenate([lines, slow_lines]), kind="stable")
        paths = pa.concat_arrays([paths, pa.array(slow_paths, pa.string())]).take(pa.array(order))
        lines = np.concatenate([lines, slow_lines])[order]
        slow = np.packbits(np.array(slow_labels, np.uint8).reshape(-1, num_classes), axis=1)
        packed = np.concatenate([packed, slow])[order]
    return paths, lines.astype(np.uint32), packed


def iter_lines(uri: str, chunk_bytes: int = _CHUNK) -> Iterator[tuple[bytes, int]]:
    """A text file as chunks of whole lines: ``(bytes, number of the chunk's first line)``, BOM dropped.

    Raises:
        StorageError: the file cannot be opened or read.
    """
    first_line, carry = 1, b""
    with storage.open_input(uri) as f:
        while True:
            try:
                block = f.read(chunk_bytes)
            except OSError as exc:
                raise storage.StorageError(f"{uri}: cannot read ({exc})") from exc
            if not block:
                break
            if first_line == 1 and not carry and block.startswith(b"\xef\xbb\xbf"):
                block = block[3:]
            block = carry + block
            cut = block.rfind(b"\n") + 1
            if cut == 0:
                carry = block
                continue
            yield block[:cut], first_line
            first_line += block.count(b"\n", 0, cut)
            carry = block[cut:]
    if carry:
        yield carry, first_line


def copy_lines(uri: str, lines: np.ndarray, choice: np.ndarray, outputs: Sequence[BinaryIO]) -> None:
    """Stream the given lines of a text file, verbatim, each to ``outputs[choice[i]]``, ending each with ``\n``.

    Args:
        uri: the file.
        lines: ``[n]`` sorted 1-based line numbers to copy.
        choice: ``[n]`` which output each line goes to.
        outputs: writable binary streams.
    """
    for data, first_line in iter_lines(uri):
        a = np.frombuffer(data, np.uint8)
        starts, ends, breaks = line_bounds(a)
        lo, hi = np.searchsorted(lines, [first_line, first_line + len(starts)])
        here, where = lines[lo:hi] - first_line, choice[lo:hi]
        for k, out in enumerate(outputs):
            picked = here[where == k]
            if not len(picked):
                continue
            keep = _byte_mask(len(a), starts[picked], ends[picked])  # each line without its \r...
            newline = breaks[picked]
            keep[newline[newline < len(a)]] = True  # ...with its \n
            out.write(a[keep].tobytes() + (b"\n" if newline[-1] == len(a) else b""))


def _majority_length(data: bytes) -> int | None:
    """The label vector length most lines of a chunk have (counting commas), for a dataset without a label.txt."""
    a = np.frombuffer(data, np.uint8)
    starts, ends, _ = line_bounds(a)
    lines = starts[ends > starts]
    commas = np.bincount(np.searchsorted(lines, np.flatnonzero(a == ord(",")), side="right") - 1,
                         minlength=len(lines))
    return int(np.bincount(commas + 1).argmax()) if len(lines) else None


def format_line(path: str, labels: tuple[int, ...] | list[int]) -> str:
    return f"{path}\t{','.join(str(int(v)) for v in labels)}"


def format_label_file(names: list[str]) -> str:
    return "".join(f"{i} {name}\n" for i, name in enumerate(names))


def _read_label_file(root: str, problems: ProblemSink) -> list[str] | None:
    """The class names, or None (with problems recorded) when label.txt is missing, unreadable or wrong."""
    uri = storage.join(root, LABEL_FILE)
    try:
        data = storage.read_bytes(uri)
    except storage.StorageError as exc:
        missing = not storage.exists(uri)
        problems.append(Problem("missing_file" if missing else "unreadable_file", LABEL_FILE, None,
                                f"{LABEL_FILE} not found in {root}" if missing else str(exc)))
        return None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        problems.append(Problem("unreadable_file", LABEL_FILE, line, f"not UTF-8 text (byte {exc.start:,})"))
        return None
    names, label_problems = parse_label_file(text)
    for p in label_problems:
        problems.append(p)
    return None if label_problems else names


def _first_chunk(root: str, files: list[str]) -> bytes | None:
    for file in files:
        try:
            for data, _ in iter_lines(storage.join(root, file)):
                return data
        except storage.StorageError:
            continue
    return None


def _num_classes_without_names(root: str, files: tuple[str, ...]) -> tuple[int, str]:
    """The label vector length to hold lists to when label.txt is unusable, and how a wrong length is explained:
    what most lines of the first text list agree on, or one more than a Parquet list's largest id."""
    text = [f for f in files if not f.endswith(parquet_lists.PARQUET_SUFFIX)]
    first = _first_chunk(root, text)
    if first:
        num_classes = _majority_length(first) or 1
        return num_classes, f"most lines have {num_classes}"
    tables = [f for f in files if f.endswith(parquet_lists.PARQUET_SUFFIX)]
    largest = max((parquet_lists.max_class_id(storage.join(root, f)) for f in tables), default=-1)
    return max(largest + 1, 1), "label.txt is unusable"


def _manifest(files: tuple[str, ...], num_classes: int, parts: list[tuple]) -> Manifest:
    """One manifest from parsed parts, whose labels are packed bits (text lists) or CSR ids (Parquet lists)."""
    if all(isinstance(labels, np.ndarray) for *_, labels in parts):
        return Manifest.concat(files, num_classes, parts)
    csr = [labels if isinstance(labels, tuple) else packed_to_csr(labels, num_classes) for *_, labels in parts]
    offsets = np.zeros(sum(len(o) - 1 for o, _ in csr) + 1, np.int64)
    np.cumsum(np.concatenate([np.diff(o) for o, _ in csr]), out=offsets[1:])
    return Manifest.from_csr(
        files, num_classes, pa.chunked_array([paths for _, paths, _, _ in parts], pa.string()),
        np.concatenate([np.full(len(lines), index, np.uint8) for index, _, lines, _ in parts]),
        np.concatenate([lines for _, _, lines, _ in parts]),
        offsets, np.concatenate([ids.astype(ids_dtype(num_classes), copy=False) for _, ids in csr]))


def read_dataset(root: str, problems: ProblemSink, files: tuple[str, ...] = ("train.txt", "val.txt")
                 ) -> tuple[list[str] | None, Manifest]:
    """Read ``label.txt`` and the lists of an MLClsDataset (local or s3://), recording every problem.

    ``files`` name the splits by their text list; a split may have ``<split>.parquet`` instead
    (:mod:`mlcls_ray.data.parquet_lists`), and the manifest's ``files`` name the lists actually read. A split with
    both forms is refused (an ``ambiguous_list`` problem) and none of its rows are read.

    Returns the class names (None when label.txt is missing or has problems, since then no name can be trusted)
    and the manifest of every well-formed line or row. Without a usable label.txt, the vectors are held to the
    length most lines of the first list agree on. Repeated paths are kept here; see :func:`drop_duplicates`.
    """
    resolved = {f: parquet_lists.list_file(root, f.removesuffix(".txt"), problems) for f in files}
    files = tuple(resolved[f] or f for f in files)
    names = _read_label_file(root, problems)
    expected = None
    if names is not None:
        num_classes = len(names)
    else:
        num_classes, expected = _num_classes_without_names(root, files)
    parts = []
    for index, (file, readable) in enumerate(zip(files, resolved.values())):
        if readable is None:
            continue  # both forms of the split: refused by list_file
        uri = storage.join(root, file)
        before, found = len(problems), len(parts)
        try:
            if file.endswith(parquet_lists.PARQUET_SUFFIX):
                for paths, rows, offsets, ids in parquet_lists.read_parquet_list(uri, file, num_classes, problems):
                    if len(rows):
                        parts.append((index, paths, rows, (offsets, ids)))
            else:
                for data, first_line in iter_lines(uri):
                    paths, lines, packed = parse_list(data, file, num_classes, problems, first_line=first_line,
                                                      expected=expected)
                    if len(lines):
                        parts.append((index, paths, lines, packed))
        except storage.StorageError as exc:
            missing = not storage.exists(uri)
            problems.append(Problem("missing_file" if missing else "unreadable_file", file, None,
                                    f"{file} not found in {root}" if missing else str(exc)))
            continue
        if len(parts) == found and len(problems) == before:
            problems.append(Problem("empty_list", file, None, f"{file} lists no images"))
    return names, _manifest(files, num_classes, parts)


def split_rows(manifest: Manifest, split: str) -> np.ndarray:
    """``[N]`` bool: the rows of one split (``train`` or ``val``), from its text or its Parquet list."""
    return manifest.rows_of(f"{split}.txt") | manifest.rows_of(f"{split}{parquet_lists.PARQUET_SUFFIX}")


def drop_duplicates(manifest: Manifest, problems: ProblemSink, order: np.ndarray | None = None) -> Manifest:
    """Drop repeated paths (within or across lists), keeping the first; each repeat is a problem.

    ``order`` is the manifest's :meth:`~Manifest.path_order`, when the caller has it already.
    """
    first = manifest.first_occurrence(order)
    repeats = np.flatnonzero(first != np.arange(len(manifest)))
    for start in range(0, len(repeats), 65_536):  # a slice of paths as Python strings at a time
        chunk = repeats[start:start + 65_536]
        for row, path in zip(chunk, manifest.paths.take(pa.array(chunk)).to_pylist()):
            original = first[row]
            problems.append(Problem(
                "duplicate_path", manifest.files[manifest.file[row]], int(manifest.line[row]),
                f"duplicate of {manifest.files[manifest.file[original]]}:{manifest.line[original]}", path))
    if not len(repeats):
        return manifest
    keep = np.ones(len(manifest), bool)
    keep[repeats] = False
    return manifest.select(keep)


def read_splits(root: str, problems: ProblemSink) -> tuple[list[str] | None, Manifest, Manifest]:
    """The class names (as :func:`read_dataset`) and the train and val rows of a dataset, repeated paths dropped."""
    names, manifest = read_dataset(root, problems)
    manifest = drop_duplicates(manifest, problems)
    return names, manifest.select(split_rows(manifest, "train")), manifest.select(split_rows(manifest, "val"))
