"""MLClsDataset parsing: every bad line becomes a problem with its file, line and reason; lines end at \\n only."""

import random
import subprocess
import sys

import numpy as np
import pytest

from mlcls_ray.data.manifest import Manifest
from mlcls_ray.data.mlcls_format import (_parse_line, drop_duplicates, iter_lines, parse_label_file, parse_list,
                                         read_dataset)


def parse(text: str, num_classes: int = 3, file: str = "train.txt"):
    problems = []
    paths, lines, packed = parse_list(text.encode("utf-8"), file, num_classes, problems)
    labels = np.unpackbits(packed, axis=1, count=num_classes).tolist()
    return list(zip(paths.to_pylist(), lines.tolist(), labels)), problems


def one_problem(text, num_classes=3):
    rows, problems = parse(text, num_classes)
    assert [r[0] for r in rows] == ["images/ok.jpg"] and len(problems) == 1, problems
    return problems[0]


def test_tab_and_space_separators_both_parse():
    rows, problems = parse("images/a.jpg\t0,1,0\nimages/b.jpg 1,0,1\n\nimages/c d.jpg  0,0,0\n"
                           "images/./e.jpg\t1,1,1\r\n")
    assert problems == []
    assert rows == [("images/a.jpg", 1, [0, 1, 0]), ("images/b.jpg", 2, [1, 0, 1]), ("images/c d.jpg", 4, [0, 0, 0]),
                    ("images/e.jpg", 5, [1, 1, 1])]


def test_the_bulk_parser_takes_only_lines_the_per_line_parser_would_accept_unchanged():
    """Every line, alone, through both parsers: the same path, labels and problems. A differential fuzz."""
    rng = random.Random(5)
    alphabet = ["a", "b", "/", ".", " ", "\t", "\r", "0", "1", ",", "\\", ":", "\x00", "é", "\f"]

    def random_line():
        if rng.random() < 0.5:  # path-and-vector shaped, with odd bytes where they hurt
            path = "".join(rng.choice(["a", "b", "/", ".", " ", "\r", "\\"]) for _ in range(rng.randint(0, 6)))
            vector = ",".join(rng.choice("01") for _ in range(2))
            if rng.random() < 0.3:
                vector = "".join(rng.choice("01, \r") for _ in range(rng.randint(0, 5)))
            return path + rng.choice(["\t", " ", "  ", "\t\t"]) + vector + rng.choice(["", "\r", " ", "\t"])
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10)))

    for _ in range(3000):
        line = random_line()
        bulk_problems, alone_problems = [], []
        paths, _, packed = parse_list((line + "\n").encode(), "t.txt", 2, bulk_problems)
        alone = _parse_line(line.removesuffix("\r"), 1, "t.txt", 2, "label.txt defines 2 classes", alone_problems)
        bulk = (paths.to_pylist(), np.unpackbits(packed, axis=1, count=2).tolist(), bulk_problems)
        assert bulk == (([alone[0]], [list(alone[1])]) if alone else ([], [])) + (alone_problems,), repr(line)


def test_a_line_built_to_make_a_regex_backtrack_parses_at_once():
    script = ("from mlcls_ray.data.mlcls_format import parse_list; p = []; "
              "parse_list(b'a.jpg ' + b', ' * 5000 + b'x y\\n', 't.txt', 3, p); print(p[0].kind)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.strip() == "no_label_field"  # a backtracking regex took hours on 80 such bytes


def test_bulk_and_per_line_parsers_agree_on_many_lines():
    rng = np.random.default_rng(0)
    labels = (rng.random((5000, 40)) < 0.2).astype(int)
    odd = {7: "images/./{i}.jpg", 100: "  images/{i}.jpg", 4000: "images/{i} x.jpg"}  # per-line parser's cases
    text = "".join(odd.get(i, "images/{i}.jpg").format(i=i) + "\t" + ",".join(map(str, y)) + "\n"
                   for i, y in enumerate(labels))
    rows, problems = parse(text, 40)
    assert problems == []
    assert [r[0] for r in rows[:8]] == [f"images/{i}.jpg" for i in range(8)]
    assert rows[4000][0] == "images/4000 x.jpg"
    assert [r[1] for r in rows] == list(range(1, 5001))
    assert np.array([r[2] for r in rows]).tolist() == labels.tolist()


@pytest.mark.parametrize("line, kind, reason", [
    ("images/a.jpg", "no_label_field", "no label vector after the path"),
    ("images/a.jpg\t", "no_label_field", "no label vector after the path"),
    ("\t0,1,0", "bad_line", "empty path before the label vector"),
    ("   \t0,1,0", "bad_line", "empty path before the label vector"),
    ("images/a.jpg\t0,1", "wrong_length", "label vector has 2 values, label.txt defines 3 classes"),
    ("images/a.jpg\t0,2,1", "bad_value", "label value '2' at position 1 is not 0 or 1"),
    ("images/a.jpg\t0,x,1", "bad_value", "label value 'x' at position 1 is not 0 or 1"),
    ("images/a.jpg\t0,1,0\textra", "bad_line", "expected 2 tab-separated fields, found 3"),
    ("/etc/passwd\t0,1,0", "unsafe_path", "absolute path"),
    ("C:\\data\\a.jpg\t0,1,0", "unsafe_path", "absolute path"),
    ("s3://other-bucket/a.jpg\t0,1,0", "unsafe_path", "absolute path"),
    ("../outside.jpg\t0,1,0", "unsafe_path", "escapes the dataset root"),
    ("images/../../outside.jpg\t0,1,0", "unsafe_path", "escapes the dataset root"),
    (".\t0,1,0", "unsafe_path", "names the dataset root itself"),
    ("images/..\t0,1,0", "unsafe_path", "names the dataset root itself"),
])
def test_each_bad_line_names_file_line_and_reason(line, kind, reason):
    problem = one_problem("images/ok.jpg\t0,0,0\n" + line + "\n")  # on line 2
    assert (problem.kind, problem.file, problem.line) == (kind, "train.txt", 2)
    assert reason in problem.reason


def test_only_newline_ends_a_line():
    """PaddleX splits on \\n; str.splitlines() would also split on these, cutting a path and shifting lines."""
    separators = ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
    text = "".join(f"images/a{sep}b{i}.jpg\t1,0,0\n" for i, sep in enumerate(separators)) + "images/last.jpg\t0,1,0"
    rows, problems = parse(text)
    assert problems == []
    assert [(path, line) for path, line, _ in rows] == [
        *((f"images/a{sep}b{i}.jpg", i + 1) for i, sep in enumerate(separators)), ("images/last.jpg", 9)]


def test_a_line_that_is_not_utf8_is_a_problem_and_the_rest_parse():
    problems = []
    paths, lines, _ = parse_list(b"images/a.jpg\t1,0\nimages/caf\xe9.jpg\t0,1\nimages/b.jpg\t1,1\n", "val.txt", 2,
                                 problems)
    assert paths.to_pylist() == ["images/a.jpg", "images/b.jpg"] and lines.tolist() == [1, 3]
    assert [(p.kind, p.line, p.reason) for p in problems] == [("bad_line", 2, "not UTF-8 text (byte 11 of the line)")]


def test_all_problems_in_one_pass():
    rows, problems = parse("images/a.jpg\t0,1\nimages/b.jpg\t0,1,0\nimages/c.jpg\t0,5,0\n../x.jpg\t0,0,0\n")
    assert [r[0] for r in rows] == ["images/b.jpg"]
    assert [(p.line, p.kind) for p in problems] == [(1, "wrong_length"), (3, "bad_value"), (4, "unsafe_path")]


def test_a_bom_read_on_its_own_does_not_end_the_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_bytes(b"\xef\xbb\xbfimages/a.jpg\t1,0\nimages/b.jpg\t0,1\n")
    chunks = [data for data, _ in iter_lines(str(path), chunk_bytes=3)]
    assert b"".join(chunks) == b"images/a.jpg\t1,0\nimages/b.jpg\t0,1\n"


def test_chunks_split_only_between_lines_and_number_lines_across_chunks(tmp_path):
    path = tmp_path / "train.txt"
    lines = b"".join(b"images/%04d.jpg\t1,0\n" % i for i in range(500))
    path.write_bytes(b"\xef\xbb\xbf" + lines + b"images/end.jpg\t0,1")
    problems, paths, lines = [], [], []
    for data, first in iter_lines(str(path), chunk_bytes=97):  # a chunk size that cuts lines everywhere
        p, n, _ = parse_list(data, "train.txt", 2, problems, first_line=first)
        paths += p.to_pylist()
        lines += n.tolist()
    assert problems == [] and lines == list(range(1, 502))
    assert paths[0] == "images/0000.jpg" and paths[-1] == "images/end.jpg"  # the BOM is not part of the path


def test_duplicates_within_and_across_lists_point_at_the_first(tmp_path):
    (tmp_path / "label.txt").write_text("0 a\n1 b\n")
    (tmp_path / "train.txt").write_text("images/a.jpg\t1,0\nimages/./a.jpg\t1,0\nimages/c.jpg\t1,0\n")
    (tmp_path / "val.txt").write_text("images/c.jpg\t0,1\nimages/a.jpg\t0,1\n")
    problems = []
    names, manifest = read_dataset(str(tmp_path), problems)
    kept = drop_duplicates(manifest, problems)
    assert names == ["a", "b"] and kept.paths.to_pylist() == ["images/a.jpg", "images/c.jpg"]
    assert [(p.file, p.line, p.reason) for p in problems] == [
        ("train.txt", 2, "duplicate of train.txt:1"), ("val.txt", 1, "duplicate of train.txt:3"),
        ("val.txt", 2, "duplicate of train.txt:1")]


def test_manifest_takes_a_few_bytes_per_image():
    n, c = 100_000, 1000
    lines = np.arange(1, n + 1, dtype=np.uint32)
    import pyarrow as pa

    paths = pa.array([f"images/{i:08d}.jpg" for i in range(n)])
    manifest = Manifest.concat(("train.txt",), c, [(0, paths, lines, np.zeros((n, c // 8), np.uint8))])
    assert manifest.nbytes / n < 25 + 4 + 4 + 1 + c / 8 + 1  # path bytes + offset + line + file + packed labels


def test_label_file_names_may_contain_spaces():
    names, problems = parse_label_file("0 airport\n1 living room\n")
    assert names == ["airport", "living room"] and problems == []


@pytest.mark.parametrize("text, line, reason", [
    ("1 a\n2 b\n", None, "out of range: 2 (line 2); missing 0"),
    ("0 a\n2 c\n", None, "missing 1"),
    ("0 a\n1 b\n1 c\n", 3, "class id 1 repeated (first at line 2)"),
    ("0 a\nx b\n", 2, "expected '<int id> <name>'"),
    ("0 a\n1 a\n", 2, "class name 'a' repeated (first at line 1)"),
    ("", None, "no classes defined"),
    ("0 a\n30000000 b\n", None, "out of range: 30000000 (line 2); missing 1"),
    ("0 a\n9999999999 b\n", None, "out of range: 9999999999 (line 2); missing 1"),
])
def test_label_file_ids_must_be_exactly_0_to_n_minus_1(text, line, reason):
    _, problems = parse_label_file(text)
    assert any(p.file == "label.txt" and p.line == line and p.kind in ("label_ids", "bad_label_line")
               and reason in p.reason for p in problems), problems


def test_label_file_lines_end_at_newline_only():
    names, problems = parse_label_file("0 a\x0bb\n1 c\x85d\n")
    assert names == ["a\x0bb", "c\x85d"] and problems == []
