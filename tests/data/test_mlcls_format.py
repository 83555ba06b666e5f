"""MLClsDataset parsing: every bad line becomes a problem with its file, line and reason."""

import pytest

from mlcls_ray.data.mlcls_format import find_duplicates, parse_label_file, parse_list_file


def one_problem(text, num_classes=3, file="train.txt"):
    entries, problems = parse_list_file(text, file, num_classes)
    assert entries == [] and len(problems) == 1, problems
    return problems[0]


def test_tab_and_space_separators_both_parse():
    entries, problems = parse_list_file("images/a.jpg\t0,1,0\nimages/b.jpg 1,0,1\n\nimages/c d.jpg  0,0,0\n",
                                        "train.txt", 3)
    assert problems == []
    assert [(e.path, e.labels, e.line) for e in entries] == [
        ("images/a.jpg", (0, 1, 0), 1), ("images/b.jpg", (1, 0, 1), 2), ("images/c d.jpg", (0, 0, 0), 4)]


@pytest.mark.parametrize("line, kind, reason", [
    ("images/a.jpg", "no_label_field", "no label vector after the path"),
    ("images/a.jpg\t", "no_label_field", "no label vector after the path"),
    ("images/a.jpg\t0,1", "wrong_length", "label vector has 2 values, label.txt defines 3 classes"),
    ("images/a.jpg\t0,2,1", "bad_value", "label value '2' at position 1 is not 0 or 1"),
    ("images/a.jpg\t0,x,1", "bad_value", "label value 'x' at position 1 is not 0 or 1"),
    ("images/a.jpg\t0,1,0\textra", "bad_line", "expected 2 tab-separated fields, found 3"),
    ("/etc/passwd\t0,1,0", "unsafe_path", "absolute path"),
    ("C:\\data\\a.jpg\t0,1,0", "unsafe_path", "absolute path"),
    ("s3://other-bucket/a.jpg\t0,1,0", "unsafe_path", "absolute path"),
    ("../outside.jpg\t0,1,0", "unsafe_path", "escapes the dataset root"),
    ("images/../../outside.jpg\t0,1,0", "unsafe_path", "escapes the dataset root"),
])
def test_each_bad_line_names_file_line_and_reason(line, kind, reason):
    problem = one_problem("\n" + line + "\n")  # on line 2
    assert (problem.kind, problem.file, problem.line) == (kind, "train.txt", 2)
    assert reason in problem.reason


def test_all_problems_in_one_pass():
    text = "images/a.jpg\t0,1\nimages/b.jpg\t0,1,0\nimages/c.jpg\t0,5,0\n../x.jpg\t0,0,0\n"
    entries, problems = parse_list_file(text, "val.txt", 3)
    assert [e.path for e in entries] == ["images/b.jpg"]
    assert [(p.line, p.kind) for p in problems] == [(1, "wrong_length"), (3, "bad_value"), (4, "unsafe_path")]


def test_duplicates_within_and_across_lists_point_at_the_first():
    train, _ = parse_list_file("images/a.jpg\t1,0\nimages/./a.jpg\t1,0\n", "train.txt", 2)
    val, _ = parse_list_file("images/a.jpg\t0,1\n", "val.txt", 2)
    kept, problems = find_duplicates(train + val)
    assert [e.path for e in kept] == ["images/a.jpg"]
    assert [(p.file, p.line, p.reason) for p in problems] == [
        ("train.txt", 2, "duplicate of train.txt:1"), ("val.txt", 1, "duplicate of train.txt:1")]


def test_label_file_names_may_contain_spaces():
    names, problems = parse_label_file("0 airport\n1 living room\n")
    assert names == ["airport", "living room"] and problems == []


@pytest.mark.parametrize("text, line, reason", [
    ("1 a\n2 b\n", None, "ids must be exactly 0..N-1 with no gaps; missing 0"),
    ("0 a\n2 c\n", None, "missing 1"),
    ("0 a\n1 b\n1 c\n", 3, "class id 1 repeated (first at line 2)"),
    ("0 a\nx b\n", 2, "expected '<int id> <name>'"),
    ("0 a\n1 a\n", 2, "class name 'a' repeated (first at line 1)"),
    ("", None, "no classes defined"),
])
def test_label_file_ids_must_be_exactly_0_to_n_minus_1(text, line, reason):
    _, problems = parse_label_file(text)
    assert any(p.file == "label.txt" and p.line == line and reason in p.reason for p in problems), problems
