"""``Audit.apply=<decisions>``: rewrite the dataset's lists with the issues a person accepted.

The decisions file is the review page's ``audit_decisions.csv`` (or ``issues.parquet`` with an ``accept`` column):
``path``, ``class_id``, ``suggested`` and ``accept`` (true/false, 1/0, yes/no, accepted/rejected). Each accepted
row sets that image's label of that class to ``suggested``. The lists are replaced together through
:func:`mlcls_ray.storage.replacing` (old or new, never a mix; the old ones kept as numbered ``.bak`` files); a text
list keeps every other line byte for byte, a Parquet list every other row and column. A label that already is as
suggested is not a change, so applying the same file twice changes nothing the second time. A decisions file with
a bad row is refused as a whole, every bad row named, and nothing is written.
"""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from mlcls_ray import results, storage
from mlcls_ray.config import Config
from mlcls_ray.data.manifest import Manifest
from mlcls_ray.data.mlcls_format import line_bounds, format_line, iter_lines, read_dataset
from mlcls_ray.data.parquet_lists import PARQUET_SUFFIX
from mlcls_ray.data.problems import ProblemLog

__all__ = ["APPLY_RESULT", "DecisionsError", "apply_decisions", "read_decisions", "run_apply"]

APPLY_RESULT = "apply_result.json"
_ACCEPT = {"true": True, "1": True, "yes": True, "accept": True, "accepted": True,
           "false": False, "0": False, "no": False, "reject": False, "rejected": False, "": False}
_REQUIRED = ("path", "class_id", "suggested", "accept")
_SHOWN = 20  # bad rows named in the error


class DecisionsError(ValueError):
    """The decisions file cannot be applied; the message names each bad row."""


def read_decisions(uri: str, num_classes: int) -> pa.Table:
    """The accepted decisions: ``path``, ``class_id`` (int64), ``suggested`` (int8).

    Raises:
        DecisionsError: unreadable, a column missing, or rows whose values are not valid (each named by its line:
            the CSV's line, header included, or the Parquet row).
    """
    parquet = uri.endswith(".parquet")
    try:
        if parquet:
            table = pq.read_table(storage.open_input(uri, seekable=True))
        else:
            with storage.open_input(uri) as f:
                table = pacsv.read_csv(f, convert_options=pacsv.ConvertOptions(
                    column_types={c: pa.string() for c in _REQUIRED}, strings_can_be_null=False))
    except (pa.ArrowInvalid, OSError) as exc:
        raise DecisionsError(f"{uri}: cannot read the decisions ({exc})") from exc
    missing = [c for c in _REQUIRED if c not in table.column_names]
    if missing:
        raise DecisionsError(f"{uri}: no column {', '.join(missing)}; expected {', '.join(_REQUIRED)} (the review "
                             "page's audit_decisions.csv, or issues.parquet with an accept column)")
    text = {c: pc.utf8_trim_whitespace(pc.cast(table[c], pa.string()).fill_null("")) for c in _REQUIRED[1:]}
    accept = pc.utf8_lower(text["accept"])
    problems = []
    checks = [
        (pc.invert(pc.is_in(accept, value_set=pa.array(list(_ACCEPT)))), "accept", "is not true or false"),
        (pc.invert(pc.match_substring_regex(text["class_id"], r"^\d+$")), "class_id", "is not a class id"),
        (pc.invert(pc.is_in(text["suggested"], value_set=pa.array(["0", "1"]))), "suggested", "is not 0 or 1"),
        (pc.equal(pc.utf8_length(pc.cast(table["path"], pa.string()).fill_null("")), 0), "path", "is empty"),
    ]
    ids = pc.cast(pc.if_else(checks[1][0], "-1", text["class_id"]), pa.int64())
    checks.append((pc.greater_equal(ids, num_classes), "class_id", f"is not below the {num_classes} classes"))
    first = 2 if not parquet else 1
    for bad, column, why in checks:
        for row in np.flatnonzero(bad.to_numpy(zero_copy_only=False))[:_SHOWN]:
            value = table[column][int(row)].as_py()
            problems.append(f"{uri}:{row + first}: {column} {value!r} {why}")
    if problems:
        raise DecisionsError("\n".join(problems[:_SHOWN]) + (f"\n(and {len(problems) - _SHOWN} more)"
                                                             if len(problems) > _SHOWN else ""))
    keep = pc.is_in(accept, value_set=pa.array([word for word, yes in _ACCEPT.items() if yes]))
    return pa.table({"path": pc.cast(table["path"], pa.string()), "class_id": ids,
                     "suggested": pc.cast(text["suggested"], pa.int8())}).filter(keep)


def _changes(manifest: Manifest, decisions: pa.Table, uri: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rows, classes, new values)`` of the accepted decisions that change a label, sorted by row.

    Raises:
        DecisionsError: a path the lists do not hold, or one (path, class) decided both ways.
    """
    rows = pc.index_in(decisions["path"], value_set=manifest.paths).fill_null(-1).to_numpy()
    unknown = np.flatnonzero(rows < 0)
    if len(unknown):
        names = decisions["path"].take(pa.array(unknown[:5])).to_pylist()
        raise DecisionsError(f"{uri}: {len(unknown)} accepted path(s) are not in the dataset's lists, e.g. "
                             f"{', '.join(names)}")
    classes = decisions["class_id"].to_numpy()
    values = decisions["suggested"].to_numpy().astype(np.uint8)
    pair = rows.astype(np.int64) * manifest.num_classes + classes
    order = np.lexsort((values, pair))
    pair, rows, classes, values = pair[order], rows[order], classes[order], values[order]
    clash = (pair[1:] == pair[:-1]) & (values[1:] != values[:-1])
    if clash.any():
        path = manifest.paths[int(rows[1:][clash][0])].as_py()
        raise DecisionsError(f"{uri}: {path} class {int(classes[1:][clash][0])} is accepted both as 0 and as 1")
    first = np.ones(len(pair), bool)
    first[1:] = pair[1:] != pair[:-1]
    rows, classes, values = rows[first], classes[first], values[first]
    change = _current(manifest, rows, classes) != values
    return rows[change], classes[change], values[change]


def _current(manifest: Manifest, rows: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """The present labels of many (row, class) pairs, a block of rows at a time."""
    out = np.empty(len(rows), np.uint8)
    unique, inverse = np.unique(rows, return_inverse=True)
    step = manifest.chunk_rows()
    for start in range(0, len(unique), step):
        dense = manifest.labels(unique[start:start + step])
        here = (inverse >= start) & (inverse < start + step)
        out[here] = dense[inverse[here] - start, classes[here]]
    return out


def _new_labels(manifest: Manifest, rows: np.ndarray, classes: np.ndarray, values: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """``(changed rows [n], their new dense labels [n, C])``."""
    unique, inverse = np.unique(rows, return_inverse=True)
    dense = manifest.labels(unique)
    dense[inverse, classes] = values
    return unique, dense


def _rewrite_text(src: str, dst: str, lines: np.ndarray, new_lines: list[str]) -> None:
    """Copy ``src`` to ``dst`` with the given (sorted, 1-based) lines replaced; every other byte kept."""
    with storage.open_output(dst) as out:
        for data, first_line in iter_lines(src):
            starts, ends, _ = line_bounds(np.frombuffer(data, np.uint8))
            lo, hi = np.searchsorted(lines, [first_line, first_line + len(starts)])
            if lo == hi:
                out.write(data)
                continue
            parts, at = [], 0
            for k in range(lo, hi):
                i = int(lines[k] - first_line)
                parts += [data[at:int(starts[i])], new_lines[k].encode()]
                at = int(ends[i])  # the line's \r (if any) and \n stay
            parts.append(data[at:])
            out.write(b"".join(parts))


def _rewrite_parquet(src: str, dst: str, row_numbers: np.ndarray, dense: np.ndarray) -> None:
    """Copy a Parquet list with the labels of some rows (1-based) replaced; its other rows and columns kept."""
    table = pq.read_table(storage.open_input(src, seekable=True))
    labels = table["labels"].combine_chunks()
    new = pa.array([np.flatnonzero(d).astype(np.int32) for d in dense], labels.type)
    take = np.arange(len(table), dtype=np.int64)
    take[row_numbers.astype(np.int64) - 1] = len(table) + np.arange(len(row_numbers))
    table = table.set_column(table.column_names.index("labels"), "labels",
                             pa.concat_arrays([labels, new]).take(pa.array(take)))
    with storage.open_output(dst) as f:
        pq.write_table(table, f, compression="zstd")


def _newest_backup(uri: str) -> str | None:
    found, n = None, 0
    candidate = f"{uri}.bak"
    while storage.exists(candidate):
        found, n = candidate, n + 1
        candidate = f"{uri}.bak.{n}"
    return found


def apply_decisions(root: str, decisions_uri: str) -> dict:
    """Apply the accepted decisions to the lists under ``root``; returns the report (counts, files, backups).

    Raises:
        DecisionsError: see :func:`read_decisions` and the lists' checks; nothing is written then.
    """
    with ProblemLog() as problems:
        names, manifest = read_dataset(root, problems)
    if names is None:
        raise DecisionsError(f"{root}: label.txt is missing or has problems; run check_dataset")
    decisions = read_decisions(decisions_uri, len(names))
    rows, classes, values = _changes(manifest, decisions, decisions_uri)
    report = {"done_flag": True, "decisions": decisions_uri, "accepted": len(decisions), "labels_changed": len(rows),
              "added": int(values.sum()), "removed": int(len(values) - values.sum()),
              "already_as_decided": len(decisions) - len(rows), "files": {}}
    if not len(rows):
        return report
    changed, dense = _new_labels(manifest, rows, classes, values)
    targets = {}
    for index, name in enumerate(manifest.files):
        mine = manifest.file[changed] == index
        if mine.any():
            targets[storage.join(root, name)] = (name, changed[mine], dense[mine])
    with storage.replacing(list(targets)) as staged:
        for uri, (name, file_rows, file_dense) in targets.items():
            lines = manifest.line[file_rows].astype(np.int64)
            order = np.argsort(lines)
            if name.endswith(PARQUET_SUFFIX):
                _rewrite_parquet(uri, staged[uri], lines[order], file_dense[order])
            else:
                paths = manifest.paths.take(pa.array(file_rows[order])).to_pylist()
                _rewrite_text(uri, staged[uri], lines[order],
                              [format_line(p, d) for p, d in zip(paths, file_dense[order])])
    report["files"] = {name: {"lines_changed": int(len(file_rows)), "backup": _newest_backup(uri)}
                       for uri, (name, file_rows, _) in targets.items()}
    return report


def run_apply(cfg: Config) -> int:
    """Apply ``Audit.apply`` to ``Global.dataset_dir``; writes ``audit/apply_result.json``; returns the exit code."""
    out = storage.join(cfg["Global.output"], "audit")
    root = cfg["Global.dataset_dir"].rstrip("/")
    try:
        with results.failure_recorded(out, APPLY_RESULT):
            report = apply_decisions(root, cfg["Audit.apply"])
    except DecisionsError as exc:
        print(f"mlcls: Audit.apply: nothing was changed:\n{exc}", file=sys.stderr)
        return 1
    uri = results.write_result(out, APPLY_RESULT, report)
    files = ", ".join(f"{n} ({f['lines_changed']} lines; old one kept as {f['backup']})"
                      for n, f in report["files"].items())
    print(f"audit apply: {report['labels_changed']:,} label(s) changed ({report['added']:,} added, "
          f"{report['removed']:,} removed) of {report['accepted']:,} accepted; "
          f"{report['already_as_decided']:,} already as decided; " + (f"rewrote {files}; " if files else "")
          + f"result: {uri}")
    return 0
