"""Problem records (file, line, reason) that the dataset tools collect, and their readable summary."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

__all__ = ["Problem", "summarize"]


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


def summarize(problems: list[Problem], examples: int = 3) -> str:
    """A short human summary: a count per kind, most common first, each with a few examples."""
    counts = Counter(p.kind for p in problems)
    lines = [f"{len(problems)} problem(s) found:"]
    for kind, n in counts.most_common():
        lines.append(f"  {n:>7,}  {kind}")
        shown = [p for p in problems if p.kind == kind][:examples]
        lines.extend(f"             {p}" for p in shown)
        if n > len(shown):
            lines.append(f"             ... and {n - len(shown):,} more")
    return "\n".join(lines)
