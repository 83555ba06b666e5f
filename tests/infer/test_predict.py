"""Predict mode (one process, no Ray): a file, a folder with bad files, a list, an s3:// prefix; PaddleX's results."""

from __future__ import annotations

import json
import os
from pathlib import Path

import boto3
import numpy as np
import pytest

from mlcls_ray.cli import main
from mlcls_ray.data.images import decode_image
from mlcls_ray.infer.predictor import Predictor
from tests.helpers import upload_tree, write_image


def _predict(model: str, source: str, output: Path, *overrides: str) -> int:
    settings = ["Global.mode=predict", f"Predict.model_dir={model}", f"Predict.input={source}",
                f"Global.output={output}", "Global.device=cpu", *overrides]
    return main(["-c", "test_resnet_ML", *[a for s in settings for a in ("-o", s)]])


def _saved(output: Path, name: str) -> dict:
    return json.loads((output / "predict" / f"{name}_res.json").read_text())["res"]


def test_one_image_gives_paddlex_result_files(tiny_model, tmp_path, capsys):
    image = write_image(tmp_path / "cat.png", size=(50, 40), fmt="PNG")
    assert _predict(tiny_model, str(image), tmp_path / "out") == 0
    res = _saved(tmp_path / "out", "cat")
    assert list(res) == ["input_path", "class_ids", "scores", "label_names"] and res["input_path"] == str(image)
    predictor = Predictor(tiny_model)
    probs = predictor([decode_image(image.read_bytes())])[0]
    ids = [int(i) for i in np.argsort(-probs) if probs[i] > predictor.thresholds[i]]
    assert res["class_ids"] == ids and res["label_names"] == [predictor.label_names[i] for i in ids]
    assert res["scores"] == [round(float(probs[i]), 5) for i in ids] == sorted(res["scores"], reverse=True)
    assert (tmp_path / "out" / "predict" / "cat_res.jpg").stat().st_size > 1000
    assert json.dumps({"res": res}) in capsys.readouterr().out


def test_a_folder_with_bad_files_goes_on_and_exits_1(tiny_model, tmp_path, capsys):
    for i in range(5):
        write_image(tmp_path / "in" / "sub" / f"{i}.jpg", color=(40 * i, 10, 10))
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with open(os.fsencode(tmp_path / "in") + b"/caf\xe9.jpg", "wb") as f:  # a name that is not UTF-8
        f.write((tmp_path / "in" / "sub" / "0.jpg").read_bytes())
    assert _predict(tiny_model, str(tmp_path / "in"), tmp_path / "out", "Predict.batch_size=2") == 1
    assert all("class_ids" in _saved(tmp_path / "out", f"sub/{i}") for i in range(5))
    broken = _saved(tmp_path / "out", "broken")
    assert broken["error_kind"] in ("corrupt_image", "not_an_image") and broken["error"]
    odd = _saved(tmp_path / "out", "caf\\xe9")
    assert odd["input_path"] == f"{tmp_path}/in/caf\\xe9.jpg"
    assert odd["scores"] == _saved(tmp_path / "out", "sub/0")["scores"]
    summary = json.loads((tmp_path / "out" / "predict_result.json").read_text())
    assert summary["images"] == 7 and summary["failed_images"] == 1
    assert "1 image(s) could not be read" in capsys.readouterr().err


def test_a_list_file_and_thresholds_by_name(tiny_model, tmp_path):
    for name in ("a.jpg", "b.jpg"):
        write_image(tmp_path / "imgs" / name)
    (tmp_path / "list.txt").write_text("imgs/a.jpg\t1,0,0,0\n\n# a comment\nimgs/b.jpg\n")
    assert _predict(tiny_model, str(tmp_path / "list.txt"), tmp_path / "out",
                    "Predict.threshold={default: 1.0, top_left: 0.0}") == 0
    for name, line in (("a", 1), ("b", 4)):
        res = _saved(tmp_path / "out", f"{name}_line{line}")
        assert res["input_path"] == str(tmp_path / "imgs" / f"{name}.jpg") and res["label_names"] == ["top_left"]


def test_an_s3_key_pyarrow_cannot_address_is_read(tiny_model, tmp_path, s3_bucket):
    for i in range(3):
        write_image(tmp_path / "up" / f"{i}.jpg")
    upload_tree(tmp_path / "up", f"{s3_bucket}/pics")
    jpeg = (tmp_path / "up" / "0.jpg").read_bytes()
    boto3.client("s3").put_object(Bucket=s3_bucket[len("s3://"):], Key="pics//3.jpg", Body=jpeg)
    assert _predict(tiny_model, f"{s3_bucket}/pics", tmp_path / "out") == 0  # read with one GET, not through pyarrow
    assert [_saved(tmp_path / "out", str(i))["input_path"] for i in range(3)] == [f"{s3_bucket}/pics/{i}.jpg"
                                                                                for i in range(3)]
    odd, same = _saved(tmp_path / "out", "3"), _saved(tmp_path / "out", "0")
    assert odd["input_path"] == f"{s3_bucket}/pics//3.jpg" and "error_kind" not in odd
    assert (odd["class_ids"], odd["scores"]) == (same["class_ids"], same["scores"])  # the same bytes as 0.jpg


@pytest.mark.parametrize(("threshold", "message"), [
    ("{3: 0.4}", "needs a 'default' key"), ("[0.5, 0.5]", "a list of 2 numbers, but the model has 4 classes"),
    ("{default: 0.5, cat: 0.2}", "'cat' is not a class of the model")])
def test_bad_thresholds_are_one_line_errors(tiny_model, tmp_path, capsys, threshold, message):
    write_image(tmp_path / "x.jpg")
    assert _predict(tiny_model, str(tmp_path / "x.jpg"), tmp_path / "out", f"Predict.threshold={threshold}") in (1, 2)
    assert message in capsys.readouterr().err


def test_a_missing_input_says_what_is_accepted(tiny_model, tmp_path, capsys):
    assert _predict(tiny_model, str(tmp_path / "nope"), tmp_path / "out") == 1
    assert "nope: not found (give an image, a folder or s3:// prefix, or a .txt list" in capsys.readouterr().err
