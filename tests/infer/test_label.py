"""Bulk labeling on a real local Ray: local and S3 (moto) in and out, corrupt files, reruns, a run killed midway,
and the scores every inference path shares (evaluate, label, predict)."""

from __future__ import annotations

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
import pytest
import ray

from mlcls_ray import storage
from mlcls_ray.cli import main
from mlcls_ray.data.images import decode_image
from mlcls_ray.infer.predictor import Predictor
from mlcls_ray.metrics import mean_average_precision
from tests.helpers import make_quadrants, upload_tree, write_image

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


def _rows(output: str) -> dict[str, dict]:
    fs, root = storage.resolve(output)
    table = pads.dataset(root, filesystem=fs, format="parquet").to_table()  # `_` and `.` names are skipped
    rows = table.to_pylist()
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)), "a path was labeled twice"
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


def test_s3_to_s3_with_corrupt_files(tiny_model, tmp_path, s3_bucket):
    upload_tree(_images(tmp_path / "in", 12), f"{s3_bucket}/photos")
    out = f"{s3_bucket}/labels/run1"
    assert _label(tiny_model, f"{s3_bucket}/photos", out, "Label.shard_size=5") == 0
    rows = _rows(out)
    assert len(rows) == 14 and all(p.startswith(f"{s3_bucket}/photos/") for p in rows)
    _check(rows, tiny_model, storage.read_bytes)
    assert json.loads(storage.read_text(f"{out}/_SUCCESS"))["failed_images"] == 2


def test_a_run_killed_midway_is_finished_by_the_rerun(tiny_model, tmp_path):
    source, out = _images(tmp_path / "in", 200), tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    args = [f"Label.model_dir={tiny_model}", f"Label.input={source}", f"Label.output={out}", "Global.device=cpu",
            "Label.batch_size=4", "Label.shard_size=6", "Global.mode=label"]
    proc = subprocess.Popen([sys.executable, "-m", "mlcls_ray.cli", "-c", "test_resnet_ML",
                             *[a for s in args for a in ("-o", s)]], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300  # a loaded 2-core machine took over 120 s to write the first parts
    while len(list(out.glob("part-*.parquet"))) < 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(_rows(str(out)))
    assert 0 < written < 202 and not (out / "_SUCCESS").exists(), f"not cut short: {written} rows"

    assert _label(tiny_model, str(source), str(out), "Label.batch_size=4", "Label.shard_size=6") == 0
    summary = json.loads((out / "_SUCCESS").read_text())
    assert summary["labeled_this_run"] == 202 - written
    rows = _rows(str(out))
    assert len(rows) == 202
    _check(rows, tiny_model, lambda p: Path(p).read_bytes())


def test_a_shard_cut_short_gets_only_its_missing_rows(tiny_model, tmp_path):
    """A part file holding 3 of a shard's 8 rows, as a killed run leaves it: the rerun labels the other 5 only."""
    source, out = _images(tmp_path / "in", 14), tmp_path / "out"
    assert _label(tiny_model, str(source), str(out), "Label.shard_size=8") == 0
    shard0 = sorted(out.glob("part-000000-*.parquet"))
    first = pa.concat_tables([pq.read_table(p) for p in shard0]).slice(2, 3)
    for part in shard0:
        part.unlink()
    pq.write_table(first, out / "part-000000-0badcafe-n3.parquet")
    (out / "_SUCCESS").unlink()

    assert _label(tiny_model, str(source), str(out), "Label.shard_size=8") == 0
    assert json.loads((out / "_SUCCESS").read_text())["labeled_this_run"] == 5
    rows = _rows(str(out))
    assert len(rows) == 16
    _check(rows, tiny_model, lambda p: Path(p).read_bytes())


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
