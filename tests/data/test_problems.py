"""The problem log: counts, first examples and the full list sorted by file and line, in bounded memory."""

import json
import os
import random

from mlcls_ray.data.problems import Problem, ProblemLog


def shuffled_problems(n=2500, seed=0):
    problems = [Problem("missing_image" if i % 3 else "corrupt_image", file, i + 1, f"reason {i}", f"images/{i}.jpg")
                for file in ("val.txt", "train.txt") for i in range(n)]
    problems.append(Problem("label_ids", "label.txt", None, "ids must be exactly 0..N-1"))
    random.Random(seed).shuffle(problems)  # decode errors arrive from Ray in no order
    return problems


def order(p):
    return {"label.txt": 0, "train.txt": 1, "val.txt": 2}[p.file], p.line or 0


def test_spilled_problems_come_out_sorted_by_file_and_line(tmp_path):
    problems = shuffled_problems()
    with ProblemLog(buffer_size=30) as log:  # 166 spilled runs: more than are merged at once
        for p in problems:
            log.append(p)
        assert len(log._runs) == 166
        head = log.write_jsonl(str(tmp_path / "errors.jsonl"), head=5)
        spill_dir = log._spill_dir
    expected = sorted(problems, key=order)
    written = [json.loads(line) for line in (tmp_path / "errors.jsonl").read_text().splitlines()]
    assert written == [p.to_dict() for p in expected]
    assert head == written[:5] and head[0] == {"kind": "label_ids", "file": "label.txt",
                                               "reason": "ids must be exactly 0..N-1"}
    assert spill_dir and not os.path.exists(spill_dir)  # spill files removed on exit


def test_counts_and_examples_are_the_first_by_line():
    with ProblemLog(examples=2) as log:
        for p in shuffled_problems(50):
            log.append(p)
        assert log.counts == {"missing_image": 66, "corrupt_image": 34, "label_ids": 1}
        assert [(p.file, p.line) for p in log.examples("corrupt_image")] == [("train.txt", 1), ("train.txt", 4)]
        summary = log.summary()
    assert summary.splitlines()[0] == "101 problem(s) found:"
    assert "train.txt:1: images/0.jpg: reason 0" in summary and "... and 32 more" in summary
