"""Problem records (file, line, reason) and the log that counts them, spools them to disk and writes them sorted.

A bad dataset of 100M images can have 100M problems, so the log never holds them all: it keeps counts, the first
few examples of each kind, and a bounded buffer that is sorted and spilled to a temporary file when full. Writing
merges the spilled runs, so the full list comes out ordered by file and line with bounded memory.
"""

from __future__ import annotations

import bisect
import heapq
import json
import os
import pickle
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Protocol

from mlcls_ray import storage

__all__ = ["Problem", "ProblemLog", "ProblemSink"]

# label.txt, then train's list, then val's; anything else (annotations) comes first
_FILE_RANK = {"label.txt": 0, "train.txt": 1, "train.parquet": 1, "val.txt": 2, "val.parquet": 2}
_FRAME = 1_000  # problems per pickle frame in a spilled run: what a merge holds of each run
_FAN_IN = 64  # runs merged at once: bounds open files and memory whatever the number of problems


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset. ``kind`` is a stable code, ``reason`` is for people."""

    kind: str
    file: str
    line: int | None
    reason: str
    path: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.path + ': ' if self.path else ''}{self.reason}"


class ProblemSink(Protocol):
    """Where parsers put the problems they find: a plain list, or a :class:`ProblemLog`."""

    def append(self, problem: Problem) -> None: ...

    def __len__(self) -> int: ...


def _key(problem: Problem, seq: int) -> tuple:
    return _FILE_RANK.get(problem.file, -1), problem.file, problem.line or 0, problem.kind, seq


def _read_run(path: str) -> Iterator[tuple[tuple, Problem]]:
    with open(path, "rb") as f:
        while True:
            try:
                yield from pickle.load(f)
            except EOFError:
                return


class ProblemLog:
    """Every problem of a run, counted by kind and by file and kind, and kept in order of file and line.

    Use it as a context manager so its spill files are removed.
    """

    def __init__(self, buffer_size: int = 200_000, examples: int = 3):
        self.counts: Counter[str] = Counter()
        self.where: Counter[tuple[str, str]] = Counter()  # (file, kind) -> count
        self._buffer: list[tuple[tuple, Problem]] = []
        self._buffer_size = buffer_size
        self._examples = examples
        self._first: dict[str, list[tuple[tuple, Problem]]] = {}  # kind -> its first problems by file and line
        self._runs: list[str] = []
        self._spill_dir: str | None = None
        self._seq = 0

    def __len__(self) -> int:
        return sum(self.counts.values())

    def __enter__(self) -> ProblemLog:
        return self

    def __exit__(self, *exc) -> None:
        if self._spill_dir:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir, self._runs = None, []

    def append(self, problem: Problem) -> None:
        key = _key(problem, self._seq)
        self._seq += 1
        self.counts[problem.kind] += 1
        self.where[problem.file, problem.kind] += 1
        first = self._first.setdefault(problem.kind, [])
        if len(first) < self._examples or key < first[-1][0]:
            bisect.insort(first, (key, problem), key=lambda e: e[0])
            del first[self._examples:]
        self._buffer.append((key, problem))
        if len(self._buffer) >= self._buffer_size:
            self._spill()

    def _write_run(self, entries: Iterable[tuple[tuple, Problem]]) -> str:
        if self._spill_dir is None:
            self._spill_dir = tempfile.mkdtemp(prefix="mlcls-problems-")
        fd, path = tempfile.mkstemp(dir=self._spill_dir, suffix=".pkl")
        with os.fdopen(fd, "wb") as f:
            frame = []
            for entry in entries:
                frame.append(entry)
                if len(frame) == _FRAME:
                    pickle.dump(frame, f, protocol=pickle.HIGHEST_PROTOCOL)
                    frame = []
            if frame:
                pickle.dump(frame, f, protocol=pickle.HIGHEST_PROTOCOL)
        return path

    def _spill(self) -> None:
        self._buffer.sort(key=lambda e: e[0])
        self._runs.append(self._write_run(self._buffer))
        self._buffer = []

    def sorted(self) -> Iterator[Problem]:
        """Every problem, ordered by file (label.txt, train.txt, val.txt) and line."""
        while len(self._runs) > _FAN_IN:  # merge in passes, _FAN_IN runs at a time
            group, self._runs = self._runs[:_FAN_IN], self._runs[_FAN_IN:]
            self._runs.append(self._write_run(heapq.merge(*map(_read_run, group), key=lambda e: e[0])))
            for path in group:
                os.remove(path)
        self._buffer.sort(key=lambda e: e[0])
        runs = [_read_run(p) for p in self._runs] + [iter(self._buffer)]
        for _, problem in heapq.merge(*runs, key=lambda e: e[0]):
            yield problem

    def examples(self, kind: str) -> list[Problem]:
        """The first problems of a kind by file and line (at most ``examples``)."""
        return [p for _, p in self._first.get(kind, [])]

    def write_jsonl(self, uri: str, head: int) -> list[dict]:
        """Stream every problem, sorted, to ``uri`` as JSON lines; return the first ``head`` of them as dicts."""
        first: list[dict] = []
        lines: list[str] = []
        with storage.open_output(uri) as f:
            for problem in self.sorted():
                record = problem.to_dict()
                if len(first) < head:
                    first.append(record)
                lines.append(json.dumps(record, ensure_ascii=False))
                if len(lines) >= _FRAME:
                    f.write(("\n".join(lines) + "\n").encode("utf-8"))
                    lines = []
            if lines:
                f.write(("\n".join(lines) + "\n").encode("utf-8"))
        return first

    def summary(self) -> str:
        """A short human summary: a count per kind, most common first, each with its first examples."""
        lines = [f"{len(self):,} problem(s) found:"]
        for kind, n in self.counts.most_common():
            lines.append(f"  {n:>7,}  {kind}")
            shown = self.examples(kind)
            lines.extend(f"             {p}" for p in shown)
            if n > len(shown):
                lines.append(f"             ... and {n - len(shown):,} more")
        return "\n".join(lines)
