"""The Parquet list format: rows read in bulk, problems named by file and row, ambiguity refused."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mlcls_ray.cli import main
from mlcls_ray.data.mlcls_format import read_splits
from mlcls_ray.data.parquet_lists import list_file, read_parquet_list, write_parquet_list
from mlcls_ray.data.problems import Problem
from mlcls_ray.data.synthetic import generate


def _write(path, paths, labels, **columns) -> str:
    pq.write_table(pa.table({"path": pa.array(paths, pa.string()),
                             "labels": pa.array(labels, pa.list_(pa.int32())), **columns}), path)
    return str(path)


def _read(uri: str, num_classes: int) -> tuple[list[str], list[int], list[list[int]], list[Problem]]:
    problems: list[Problem] = []
    paths, rows, labels = [], [], []
    for p, r, offsets, ids in read_parquet_list(uri, "train.parquet", num_classes, problems):
        paths += p.to_pylist()
        rows += r.tolist()
        labels += [ids[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
    return paths, rows, labels, problems


def test_good_rows_come_back_with_sorted_ids_and_row_numbers(tmp_path):
    uri = _write(tmp_path / "train.parquet", ["a.jpg", "d/b.jpg", "./c.jpg"], [[3, 0], [], [1]])
    paths, rows, labels, problems = _read(uri, 4)
    assert (paths, rows, labels, problems) == (["a.jpg", "d/b.jpg", "c.jpg"], [1, 2, 3], [[0, 3], [], [1]], [])


def test_each_bad_row_is_named_by_row_and_left_out(tmp_path):
    uri = _write(tmp_path / "train.parquet",
                 ["ok.jpg", "../escape.jpg", "", "range.jpg", "twice.jpg", "null.jpg", "last.jpg"],
                 [[1], [0], [0], [0, 7], [2, 2], None, [2]])
    paths, rows, labels, problems = _read(uri, 4)
    assert paths == ["ok.jpg", "last.jpg"] and rows == [1, 7] and labels == [[1], [2]]
    found = {(p.line, p.kind): p.reason for p in problems}
    assert set(found) == {(2, "unsafe_path"), (3, "bad_line"), (4, "bad_value"), (5, "bad_value"),
                          (6, "no_label_field")}
    assert "class id 7 is outside label.txt's 0..3" in found[4, "bad_value"]
    assert "class id 2 appears twice" in found[5, "bad_value"]
    assert all(p.file == "train.parquet" for p in problems)


def test_a_file_without_the_columns_or_not_parquet_is_one_problem(tmp_path):
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"image": ["a.jpg"], "labels": [[0]]}), wrong)
    not_parquet = tmp_path / "text.parquet"
    not_parquet.write_text("a.jpg\t0,1\n")
    for uri, words in ((wrong, "needs columns 'path'"), (not_parquet, "not a Parquet file")):
        _, _, _, problems = _read(str(uri), 2)
        assert len(problems) == 1 and problems[0].kind == "unreadable_file" and words in problems[0].reason


def test_both_forms_of_a_split_are_refused(tmp_path):
    problems: list[Problem] = []
    assert list_file(str(tmp_path), "train", problems) == "train.txt"  # neither: the text list, reported missing
    _write(tmp_path / "train.parquet", ["a.jpg"], [[0]])
    assert list_file(str(tmp_path), "train", problems) == "train.parquet"
    (tmp_path / "train.txt").write_text("a.jpg\t1,0\n")
    assert list_file(str(tmp_path), "train", problems) is None
    assert [p.kind for p in problems] == ["ambiguous_list"] and "train.txt and train.parquet" in problems[0].reason


def test_written_lists_read_back_the_same(tmp_path):
    offsets, ids = np.array([0, 2, 2, 3]), np.array([1, 5, 0])
    uri = str(tmp_path / "val.parquet")
    write_parquet_list(uri, pa.array(["x.jpg", "y.jpg", "z.jpg"]), offsets, ids)
    paths, rows, labels, problems = _read(uri, 6)
    assert (paths, labels, problems) == (["x.jpg", "y.jpg", "z.jpg"], [[1, 5], [], [0]], [])


def test_row_numbers_continue_across_batches(tmp_path, monkeypatch):
    monkeypatch.setattr("mlcls_ray.data.parquet_lists._BATCH_ROWS", 2)
    uri = _write(tmp_path / "train.parquet", ["a", "b", "../c", "d", "e"], [[0], [0], [0], [9], [1]])
    paths, rows, _, problems = _read(uri, 2)
    assert paths == ["a", "b", "e"] and rows == [1, 2, 5] and [p.line for p in problems] == [3, 4]


def test_a_dataset_may_mix_forms_and_a_split_with_both_is_refused(tmp_path):
    (tmp_path / "label.txt").write_text("0 cat\n1 dog\n2 fox\n")
    _write(tmp_path / "train.parquet", ["a.jpg", "b.jpg", "../bad.jpg"], [[2], [0, 1], [0]])
    (tmp_path / "val.txt").write_text("c.jpg\t0,0,1\n")
    problems: list[Problem] = []
    names, train, val = read_splits(str(tmp_path), problems)
    assert names == ["cat", "dog", "fox"]
    assert train.paths.to_pylist() == ["a.jpg", "b.jpg"] and train.labels(slice(None)).tolist() == [[0, 0, 1],
                                                                                                     [1, 1, 0]]
    assert val.paths.to_pylist() == ["c.jpg"] and val.labels(slice(None)).tolist() == [[0, 0, 1]]
    assert [(p.file, p.line, p.kind) for p in problems] == [("train.parquet", 3, "unsafe_path")]

    (tmp_path / "train.txt").write_text("a.jpg\t0,0,1\n")
    problems = []
    _, train, val = read_splits(str(tmp_path), problems)
    assert len(train) == 0 and len(val) == 1  # neither form of train is read: which one is current is unknown
    assert [(p.file, p.kind) for p in problems] == [("train.parquet", "ambiguous_list")]


def test_thousands_of_classes_stay_sets(tmp_path):
    (tmp_path / "label.txt").write_text("".join(f"{i} c{i}\n" for i in range(5000)))
    _write(tmp_path / "train.parquet", [f"{i}.jpg" for i in range(100)], [[i % 10, 4999 - i] for i in range(100)])
    _write(tmp_path / "val.parquet", ["v.jpg"], [[7]])
    _, train, val = read_splits(str(tmp_path), [])
    assert train.sparse and train.nbytes < 100 * 100  # packed bits would be 625 bytes a row
    assert train.class_counts()[[3, 4999, 4900, 2500]].tolist() == [10, 1, 1, 0]
    assert val.labels(slice(None)).nonzero()[1].tolist() == [7]


def test_convert_split_and_check_through_parquet_lists(ray_start_2_cpus, tmp_path, monkeypatch):
    monkeypatch.setattr("mlcls_ray.data.manifest_rows.STAGE_ROWS", 10)  # the check reads staged rows on workers
    root = generate(tmp_path / "demo", 60, seed=3)
    for name in ("label.txt", "train.txt", "val.txt"):
        (root / name).unlink()
    settings = ["Global.mode=check_dataset", f"Global.dataset_dir={root}", "CheckDataset.convert.enable=True",
                "CheckDataset.convert.src_dataset_type=COCO", "CheckDataset.convert.list_format=parquet",
                "CheckDataset.split.enable=True", "CheckDataset.split.train_percent=75",
                "CheckDataset.split.val_percent=25"]
    for run in ("out1", "out2"):
        args = [*settings, f"Global.output={tmp_path / run}"]
        assert main(["-c", "PP-LCNet_x1_0_ML", *[a for s in args for a in ("-o", s)]]) == 0
        if run == "out1":
            lists = {p.name: p.read_bytes() for p in root.glob("*.parquet")}
    assert {p.name: p.read_bytes() for p in root.glob("*.parquet")} == lists  # the second run rewrote nothing
    assert sorted(p.name for p in root.glob("*.txt*")) == ["label.txt"]  # no text list beside the Parquet ones
    result = json.loads((tmp_path / "out2" / "check_dataset_result.json").read_text())
    assert result["check_pass"] and (result["attributes"]["train_samples"], result["attributes"]["val_samples"]) == (
        45, 15)
    assert pq.read_table(root / "val.parquet").num_rows == 15
    assert not list((tmp_path / "out2").glob(".mlcls-rows-*"))  # the staged rows are gone
