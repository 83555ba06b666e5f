"""Audit.apply: accepted decisions rewrite the lists once, with backups; a bad decisions file changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlcls_ray.cli import main
from mlcls_ray.data.parquet_lists import write_parquet_list
from tests.helpers import make_mlcls

pytestmark = pytest.mark.usefixtures("ray_start_2_cpus")

HEADER = "path,list_file,line,class_id,class_name,kind,given,suggested,accept\n"


def _apply(root: Path, out: Path, decisions: Path) -> int:
    return main(["-c", "PP-LCNet_x1_0_ML", "-o", "Global.mode=audit", "-o", f"Global.dataset_dir={root}",
                 "-o", f"Global.output={out}", "-o", f"Audit.apply={decisions}"])


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = make_mlcls(tmp_path / "ds", ["cat", "dog"],
                      [("images/a.jpg", [1, 0]), ("images/b.jpg", [0, 1]), ("images/c.jpg", [1, 1])],
                      [("images/d.jpg", [0, 0])], make_images=False)
    train = root / "train.txt"
    train.write_bytes(train.read_bytes().replace(b"images/b.jpg\t0,1\n", b"images/b.jpg 0, 1\r\n"))  # kept as is
    return root


def test_accepted_issues_change_the_lists_once_with_backups(dataset, tmp_path, capsys):
    decisions = tmp_path / "audit_decisions.csv"
    decisions.write_text(HEADER + "images/a.jpg,train.txt,1,1,dog,missing,0,1,true\n"
                         "images/c.jpg,train.txt,3,0,cat,wrong,1,0,TRUE\n"
                         "images/b.jpg,train.txt,2,1,dog,wrong,1,0,false\n"
                         "images/d.jpg,val.txt,1,0,cat,missing,0,1,accepted\n")
    old_train, old_val = (dataset / "train.txt").read_bytes(), (dataset / "val.txt").read_bytes()
    assert _apply(dataset, tmp_path / "out", decisions) == 0
    assert (dataset / "train.txt").read_bytes() == b"images/a.jpg\t1,1\nimages/b.jpg 0, 1\r\nimages/c.jpg\t0,1\n"
    assert (dataset / "val.txt").read_text() == "images/d.jpg\t1,0\n"
    assert (dataset / "train.txt.bak").read_bytes() == old_train and (dataset / "val.txt.bak").read_bytes() == old_val
    report = json.loads((tmp_path / "out" / "audit" / "apply_result.json").read_text())
    assert (report["labels_changed"], report["added"], report["removed"]) == (3, 2, 1)
    assert report["files"]["train.txt"] == {"lines_changed": 2, "backup": str(dataset / "train.txt.bak")}
    assert "3 label(s) changed (2 added, 1 removed)" in capsys.readouterr().out

    assert _apply(dataset, tmp_path / "out", decisions) == 0  # a second time: nothing left to change
    assert (dataset / "train.txt").read_bytes() == b"images/a.jpg\t1,1\nimages/b.jpg 0, 1\r\nimages/c.jpg\t0,1\n"
    assert not (dataset / "train.txt.bak.1").exists() and not (dataset / "val.txt.bak.1").exists()
    report = json.loads((tmp_path / "out" / "audit" / "apply_result.json").read_text())
    assert (report["labels_changed"], report["already_as_decided"], report["files"]) == (0, 3, {})


def test_a_bad_decisions_file_names_every_bad_line_and_changes_nothing(dataset, tmp_path, capsys):
    decisions = tmp_path / "d.csv"
    decisions.write_text(HEADER + "images/a.jpg,train.txt,1,1,dog,missing,0,1,true\n"
                         "images/b.jpg,train.txt,2,7,x,missing,0,1,true\n"
                         "images/c.jpg,train.txt,3,0,cat,wrong,1,0,maybe\n")
    before = (dataset / "train.txt").read_bytes()
    assert _apply(dataset, tmp_path / "out", decisions) == 1
    err = capsys.readouterr().err
    assert f"{decisions}:3: class_id '7' is not below the 2 classes" in err
    assert f"{decisions}:4: accept 'maybe' is not true or false" in err and "nothing was changed" in err
    assert (dataset / "train.txt").read_bytes() == before and not (dataset / "train.txt.bak").exists()

    decisions.write_text(HEADER + "images/zzz.jpg,train.txt,1,1,dog,missing,0,1,true\n")
    assert _apply(dataset, tmp_path / "out", decisions) == 1
    assert "1 accepted path(s) are not in the dataset's lists, e.g. images/zzz.jpg" in capsys.readouterr().err


def test_a_parquet_list_keeps_its_other_rows_and_columns(tmp_path):
    root = make_mlcls(tmp_path / "ds", ["cat", "dog"], [], [("images/d.jpg", [0, 0])], make_images=False)
    (root / "train.txt").unlink()
    write_parquet_list(str(root / "train.parquet"), pa.array(["images/a.jpg", "images/b.jpg"]),
                       np.array([0, 1, 3]), np.array([0, 0, 1]))
    table = pq.read_table(root / "train.parquet").append_column("source", pa.array(["web", "studio"]))
    pq.write_table(table, root / "train.parquet")
    decisions = tmp_path / "issues.parquet"
    pq.write_table(pa.table({"path": ["images/b.jpg"], "class_id": [0], "suggested": [0], "accept": [True]}),
                   decisions)
    assert _apply(root, tmp_path / "out", decisions) == 0
    after = pq.read_table(root / "train.parquet")
    assert after["labels"].to_pylist() == [[0], [1]] and after["source"].to_pylist() == ["web", "studio"]
    assert pq.read_table(root / "train.parquet.bak")["labels"].to_pylist() == [[0], [0, 1]]
