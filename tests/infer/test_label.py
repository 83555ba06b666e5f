"""Bulk labeling on a real local Ray: local and S3 (moto) in and out, one GET per S3 image, corrupt files and odd
names, reruns, a run killed midway, a retried write, a second run or another model refused, the scores kept, and the
scores every inference path shares (evaluate, label, predict)."""

from __future__ import annotations

import collections
import fnmatch
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import boto3
import pytest
import ray

from mlcls_ray import storage
from mlcls_ray.cli import main
from mlcls_ray.data.images import decode_image
from mlcls_ray.infer import label_output
from mlcls_ray.infer.lease import Lease
from mlcls_ray.infer.predictor import Predictor
from mlcls_ray.metrics import mean_average_precision
from tests.helpers import make_quadrants, s3_requests, upload_tree, write_image
from tests.infer.conftest import save_tiny_model

pytestmark = pytest.mark.usefixtures("ray_start_2_cpus")


def _images(root: Path, n: int) -> Path:
    """``n`` small JPEGs in two folders, plus a not-an-image, a truncated PNG and a non-image file to skip."""
    for i in range(n):
        write_image(root / ("a" if i % 2 else "b") / f"{i:04d}.jpg", size=(40 + i % 7, 30), color=(i * 7 % 255, 90, 40))
    (root / "a" / "fake.jpg").write_bytes(b"this is not an image")
    (root / "b" / "cut.png").write_bytes((root / "b" / "0000.jpg").read_bytes()[:200])
    (root / "notes.csv").write_text("skipped: not an image extension\n")
    return root


def _label(model: str, source: str, output: str, *overrides: str) -> int:
    settings = ["Global.mode=label", f"Label.model_dir={model}", f"Label.input={source}", f"Label.output={output}",
                "Global.device=cpu", "Label.batch_size=8", *overrides]
    return main(["-c", "test_resnet_ML", *[a for s in settings for a in ("-o", s)]])


def _table(output: str) -> pa.Table:
    """The output as the README reads it: the files matching ``part-*.parquet``, nothing else."""
    fs, root = storage.resolve(output)
    names = [n for n in storage.list_files(output) if fnmatch.fnmatch(n, label_output.PART_GLOB)]
    return pads.dataset([f"{root}/{n}" for n in names], filesystem=fs, format="parquet").to_table()


def _rows(output: str) -> dict[str, dict]:
    rows = _table(output).to_pylist()
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)), "a path was labeled twice"
    fs, root = storage.resolve(output)
    assert pads.dataset(root, filesystem=fs, format="parquet").count_rows() == len(rows)  # `_`, `.` names skipped
    return {r["path"]: r for r in rows}


def _check(rows: dict[str, dict], model: str, read) -> None:
    predictor = Predictor(model)
    good = {p: r for p, r in rows.items() if r["error"] is None}
    bad = {p: r for p, r in rows.items() if r["error"] is not None}
    assert {p.rsplit("/", 1)[1]: r["error_kind"] for p, r in bad.items()} == {"fake.jpg": "not_an_image",
                                                                              "cut.png": "corrupt_image"}
    assert all(r["scores"] is None and r["class_ids"] == [] for r in bad.values())
    paths = sorted(good)
    expected = predictor([decode_image(read(p)) for p in paths])
    got = np.array([good[p]["scores"] for p in paths], np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    for p, probs in zip(paths, expected):
        ids = [int(i) for i in np.argsort(-probs) if probs[i] > predictor.thresholds[i]]
        assert good[p]["class_ids"] == ids
        assert good[p]["label_names"] == [predictor.label_names[i] for i in ids]


def test_label_a_folder_then_rerun_writes_nothing_new(tiny_model, tmp_path):
    source, out = _images(tmp_path / "in", 30), tmp_path / "out"
    assert _label(tiny_model, str(source), str(out), "Label.shard_size=8") == 0
    rows = _rows(str(out))
    assert len(rows) == 32
    _check(rows, tiny_model, lambda p: Path(p).read_bytes())
    summary = json.loads((out / "_SUCCESS").read_text())
    assert summary["images"] == 32 and summary["failed_by_kind"] == {"not_an_image": 1, "corrupt_image": 1}
    parts = sorted(p.name for p in out.glob("part-*.parquet"))
    assert parts == [f"part-{s:06d}.parquet" for s in range(4)]  # one whole shard each, not pieces of many
    assert pq.ParquetFile(out / parts[0]).metadata.row_group(0).column(0).compression == "ZSTD"

    assert _label(tiny_model, str(source), str(out), "Label.shard_size=8") == 0
    assert sorted(p.name for p in out.glob("part-*.parquet")) == parts
    assert json.loads((out / "_SUCCESS").read_text())["labeled_this_run"] == 0
    assert len(_rows(str(out))) == 32


def test_an_output_of_another_input_is_refused(tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    assert _label(tiny_model, str(_images(tmp_path / "one", 2)), str(out)) == 0
    assert _label(tiny_model, str(_images(tmp_path / "two", 2)), str(out)) == 1
    assert "holds the labels of" in capsys.readouterr().err
    assert json.loads((out / "_FAILURE").read_text())["done_flag"] is False


def test_s3_to_s3_with_corrupt_files_and_odd_keys(tiny_model, tmp_path, s3_bucket, s3_server):
    upload_tree(_images(tmp_path / "in", 12), f"{s3_bucket}/photos")
    jpeg, bucket = (tmp_path / "in" / "b" / "0000.jpg").read_bytes(), s3_bucket[len("s3://"):]
    odd = {"photos/a b/c d.jpg": None, "photos/été/日本.jpg": None, "photos//double.jpg": None,
           "photos/big.jpg": "file_too_large"}
    for key in odd:
        boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=jpeg * (10 if "big" in key else 1))
    out = f"{s3_bucket}/labels/run1"
    with s3_requests(s3_server, tmp_path) as seen:  # the same input as no slash
        assert _label(tiny_model, f"{s3_bucket}/photos/", out, "Label.shard_size=5",
                      f"Global.max_file_bytes={5 * len(jpeg)}") == 0
    rows = _rows(out)
    assert len(rows) == 18 and all(p.startswith(f"{s3_bucket}/photos/") for p in rows)
    # each image read with one GET and no HEAD; big.jpg refused by the size its listing gave, with no request
    reads = collections.Counter((m, p) for m, p in seen if p.startswith(f"/{bucket}/photos/"))
    assert reads == {("GET", "/" + p[len("s3://"):]): 1 for p in rows if not p.endswith("/big.jpg")}
    odd_rows = {key: rows.pop(f"{s3_bucket}/{key}") for key in odd}
    assert {key: row["error_kind"] for key, row in odd_rows.items()} == odd
    assert odd_rows["photos//double.jpg"]["scores"] == odd_rows["photos/a b/c d.jpg"]["scores"]  # same bytes
    _check(rows, tiny_model, storage.read_bytes)
    assert json.loads(storage.read_text(f"{out}/_SUCCESS"))["failed_images"] == 3
    assert _label(tiny_model, f"{s3_bucket}/photos", out + "/", "Label.shard_size=5") == 0
    assert json.loads(storage.read_text(f"{out}/_SUCCESS"))["labeled_this_run"] == 0


def _written(out: Path) -> int:
    """Rows labeled so far: those in parts, and the plan rows the pieces of shards not yet complete hold."""
    parts = sum(pq.read_metadata(p).num_rows for p in out.glob("part-*.parquet"))
    pieces = {(p.parent.name, row) for p in out.glob("_work/shard-*/piece-*.parquet")
              if not (out / f"part-{p.parent.name[len('shard-'):]}.parquet").exists()
              for row in pq.read_table(p, columns=["row"])["row"].to_pylist()}
    return parts + len(pieces)


def test_a_run_killed_midway_is_finished_by_the_rerun(tiny_model, tmp_path):
    source, out = _images(tmp_path / "in", 200), tmp_path / "out"
    out.mkdir()
    (out / "_SUCCESS").write_text("{}")  # a stale summary: a run that starts must withdraw it until it ends
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    args = [f"Label.model_dir={tiny_model}", f"Label.input={source}", f"Label.output={out}", "Global.device=cpu",
            "Label.batch_size=4", "Label.shard_size=6", "Global.mode=label"]
    proc = subprocess.Popen([sys.executable, "-m", "mlcls_ray.cli", "-c", "test_resnet_ML",
                             *[a for s in args for a in ("-o", s)]], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300  # a loaded 2-core machine took over 120 s to write the first rows
    while not any(out.glob("_work/shard-*/piece-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(2)  # Ray ends the dead driver's tasks; a write in flight may still land
    written = _written(out)
    assert 0 < written < 202 and not (out / "_SUCCESS").exists(), f"not cut short: {written} rows"

    assert _label(tiny_model, str(source), str(out), "Label.batch_size=4", "Label.shard_size=6") == 0
    summary = json.loads((out / "_SUCCESS").read_text())
    assert summary["labeled_this_run"] == 202 - written
    rows = _rows(str(out))
    assert len(rows) == 202
    _check(rows, tiny_model, lambda p: Path(p).read_bytes())


def test_a_retried_write_and_a_shard_cut_short_leave_each_row_once(tiny_model, tmp_path):
    """Shard 0 as a run stopped midway leaves it, after Ray retried a write task whose rows were already written and
    a differently batched retry wrote some of them again: the rerun labels only the rows no piece holds, and the
    shard's part has every row once. A killed write's temporary file is cleaned up."""
    source, out = _images(tmp_path / "in", 14), tmp_path / "out"
    assert _label(tiny_model, str(source), str(out), "Label.shard_size=8") == 0
    labeled = pq.read_table(out / "part-000000.parquet")
    labeled = labeled.add_column(0, "row", pa.array(range(8), pa.int32())).add_column(0, "shard", pa.array([0] * 8))
    (out / "part-000000.parquet").unlink()
    for rows in ((2, 3), (2, 3), (3, 3)):  # rows 2-4, the same task again, then rows 3-5
        label_output.write_pieces(labeled.slice(*rows), str(out), "all", "float32")
    (out / ".tmp-1234-part-000000.parquet").write_bytes(b"half a file")

    assert _label(tiny_model, str(source), str(out), "Label.shard_size=8") == 0
    assert json.loads((out / "_SUCCESS").read_text())["labeled_this_run"] == 4  # rows 0, 1, 6, 7
    rows = _rows(str(out))
    assert len(rows) == 16
    _check(rows, tiny_model, lambda p: Path(p).read_bytes())
    assert pq.read_table(out / "part-000000.parquet")["path"].to_pylist() == labeled["path"].to_pylist()
    assert not list(out.glob(".tmp-*")) and not (out / "_work").exists()


def test_a_second_run_or_another_model_is_refused(tiny_model, tmp_path, capsys):
    source, out = _images(tmp_path / "in", 6), tmp_path / "out"
    with Lease(str(out)) as live:
        assert _label(tiny_model, str(source), str(out)) == 1
        assert f"is being written by run {live.run}" in capsys.readouterr().err
        assert not (out / "_FAILURE").exists() and not (out / "_plan").exists()  # nothing of it touched
    assert _label(tiny_model, str(source), str(out), "Label.scores=top:2", "Label.scores_dtype=float16") == 0
    table = _table(str(out))
    assert table.column_names == ["path", "class_ids", "label_names", "top_class_ids", "top_scores", "error_kind",
                                  "error"] and table.schema.field("top_scores").type.value_type == pa.float16()
    predictor = Predictor(tiny_model)
    for row in table.to_pylist():
        if row["error"] is None:
            probs = predictor([decode_image(Path(row["path"]).read_bytes())])[0]
            assert row["top_class_ids"] == np.argsort(-probs)[:2].tolist()
            np.testing.assert_allclose(row["top_scores"], np.sort(probs)[::-1][:2], rtol=1e-3)

    other, base = save_tiny_model(tmp_path / "other", seed=1), ["Label.scores=top:2", "Label.scores_dtype=float16"]
    capsys.readouterr()
    for model, overrides, said in ((other, base, "the weights (sha256 of model.safetensors)"),
                                   (tiny_model, [*base, "Label.threshold=0.3"], "the thresholds"),
                                   (tiny_model, ["Label.scores_dtype=float16"],
                                    "Label.scores 'top:2' there, 'all' now"),
                                   (tiny_model, ["Label.scores=top:2"], "Label.scores_dtype 'float16' there")):
        assert _label(model, str(source), str(out), *overrides) == 1
        err = capsys.readouterr().err
        assert said in err and "give a new Label.output" in err and len(err.strip().splitlines()) == 2, err
        assert (out / "_SUCCESS").exists()  # the complete output stays as it was


def test_local_names_that_are_not_utf8_and_a_list_with_duplicates(tiny_model, tmp_path):
    folder = tmp_path / "in"
    write_image(folder / "x.jpg", color=(10, 200, 30))
    raw = os.fsencode(folder) + b"/caf\xe9 .jpg"  # latin-1, not UTF-8, and a trailing space
    with open(raw, "wb") as f:
        f.write((folder / "x.jpg").read_bytes())
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"in/x.jpg\t1,0,0,0\r\nin/caf\xe9 .jpg\nin/x.jpg\n")
    out = tmp_path / "out"
    assert _label(tiny_model, str(listing), str(out)) == 0
    rows = _table(str(out)).to_pylist()
    assert [r["path"] for r in rows] == [f"{folder}/x.jpg", f"{folder}/caf\\xe9 .jpg", f"{folder}/x.jpg"]
    assert all(r["error"] is None for r in rows) and rows[0]["scores"] == rows[1]["scores"] == rows[2]["scores"]
    label_output.load_plan(str(folder), str(tmp_path / "walked"), 10, {})  # a walked folder plans the name too
    planned = pq.read_table(label_output.shard_uri(str(tmp_path / "walked"), 0))["path"].to_pylist()
    assert planned == [raw, os.fsencode(folder / "x.jpg")]


def test_evaluate_label_and_predict_give_the_same_scores(tiny_model, tmp_path):
    data = make_quadrants(tmp_path / "q", num_train=4, num_val=24, size=48)
    common = ["-o", f"Global.dataset_dir={data}", "-o", "Global.device=cpu"]
    assert main(["-c", "test_resnet_ML", "-o", "Global.mode=evaluate", "-o", f"Evaluate.weight_path={tiny_model}",
                 "-o", f"Global.output={tmp_path / 'eval'}", *common]) == 0
    evaluated = json.loads((tmp_path / "eval" / "evaluate_result.json").read_text())["metrics"]["MultiLabelMAP"]

    assert _label(tiny_model, str(data / "val.txt"), str(tmp_path / "labels")) == 0  # a PaddleX list, as it is
    rows = _rows(str(tmp_path / "labels"))
    lines = [line.split("\t") for line in (data / "val.txt").read_text().splitlines()]
    scores = np.array([rows[str(data / p)]["scores"] for p, _ in lines], np.float32)
    truth = np.array([[int(v) for v in y.split(",")] for _, y in lines])
    assert mean_average_precision(np.log(scores / (1 - scores)), truth) == pytest.approx(evaluated, abs=1e-6)

    assert main(["-c", "test_resnet_ML", "-o", "Global.mode=predict", "-o", f"Predict.model_dir={tiny_model}",
                 "-o", f"Predict.input={data / 'images'}", "-o", f"Global.output={tmp_path / 'pred'}",
                 "-o", "Predict.batch_size=5", "-o", "Predict.threshold=0.0", *common]) == 0
    for path, _ in lines:
        saved = json.loads((tmp_path / "pred" / "predict" / (Path(path).stem + "_res.json")).read_text())["res"]
        by_id = dict(zip(saved["class_ids"], saved["scores"]))
        np.testing.assert_allclose([by_id[c] for c in range(4)], rows[str(data / path)]["scores"], atol=6e-6)
