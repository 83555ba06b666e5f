"""check_dataset end to end on a real local Ray: every problem with file, line and reason; local == S3."""

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlcls_ray.cli import main
from mlcls_ray.data.synthetic import generate
from tests.helpers import make_mlcls, upload_tree, write_image

REPO = Path(__file__).resolve().parents[2]
NAMES = ["cat", "dog", "bird"]


def run_check(root, out, *extra) -> int:
    return main(["-c", "PP-LCNet_x1_0_ML", "-o", f"Global.dataset_dir={root}", "-o", f"Global.output={out}",
                 *(f"-o{e}" for e in extra)])


def result(out) -> dict:
    return json.loads((Path(out) / "check_dataset_result.json").read_text())


def ours(stderr: str, first_line: str) -> str:
    """Our message at the end of stderr, without what Ray's loggers wrote before it."""
    assert first_line in stderr, stderr[-2000:]
    return stderr[stderr.rindex(first_line):]


def tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def broken(tmp_path):
    """A dataset with one of every problem, each on a known line."""
    root = tmp_path / "broken"
    make_mlcls(root, NAMES, train=[("images/good.jpg", [1, 0, 0])], val=[("images/good_val.jpg", [0, 1, 0])])
    images = root / "images"
    (images / "empty.jpg").write_bytes(b"")
    full = (images / "good.jpg").read_bytes()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(images / "noise.jpg")
    (images / "truncated.jpg").write_bytes((images / "noise.jpg").read_bytes()[:600])
    (images / "notes.jpg").write_text("not a picture")
    Image.new("L", (1200, 1000)).save(images / "bomb.png")  # 1.2 M pixels > the 1 M limit set below
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(full)
    os.symlink(outside, images / "link.jpg")
    (root / "train.txt").write_text("\n".join([
        "images/good.jpg\t1,0,0",       # 1 fine
        "images/missing.jpg\t0,1,0",    # 2
        "images/empty.jpg\t0,0,1",      # 3
        "images/truncated.jpg\t1,1,0",  # 4
        "images/notes.jpg\t0,1,1",      # 5
        "images/bomb.png\t1,0,0",       # 6
        "images/noise.jpg",             # 7 no label field
        "images/noise.jpg\t1,0",        # 8
        "images/noise.jpg\t0,2,0",      # 9
        "images/good.jpg\t1,0,0",       # 10 duplicate of line 1
        "../secret.jpg\t1,0,0",         # 11
        "/etc/passwd\t1,0,0",           # 12
        "images/link.jpg\t0,0,1",       # 13 symlink out of the root
    ]) + "\n")
    return root


EXPECTED = [
    ("train.txt", 2, "missing_image", "image file not found"),
    ("train.txt", 3, "empty_file", "empty file (0 bytes)"),
    ("train.txt", 4, "corrupt_image", "truncated or corrupt image data"),
    ("train.txt", 5, "not_an_image", "not an image"),
    ("train.txt", 6, "decompression_bomb", "1200x1000 = 1,200,000 pixels, over the limit of 1,000,000"),
    ("train.txt", 7, "no_label_field", "no label vector after the path"),
    ("train.txt", 8, "wrong_length", "label vector has 2 values, label.txt defines 3 classes"),
    ("train.txt", 9, "bad_value", "label value '2' at position 1 is not 0 or 1"),
    ("train.txt", 10, "duplicate_path", "duplicate of train.txt:1"),
    ("train.txt", 11, "unsafe_path", "escapes the dataset root"),
    ("train.txt", 12, "unsafe_path", "absolute path"),
    ("train.txt", 13, "unsafe_path", "a symlink resolves outside the dataset root"),
]


def test_every_problem_is_reported_with_file_line_and_reason(ray_start_2_cpus, broken, tmp_path, capsys):
    before = tree_digest(broken)
    code = run_check(broken, tmp_path / "out", "Global.max_image_pixels=1000000")
    assert code == 1
    report = result(tmp_path / "out")
    assert report["done_flag"] is True and report["check_pass"] is False
    got = [(e["file"], e["line"], e["kind"]) for e in report["errors"]]
    assert got == [(f, line, kind) for f, line, kind, _ in EXPECTED]
    for error, (*_, reason) in zip(report["errors"], EXPECTED):
        assert reason in error["reason"]
    assert report["error_counts"]["unsafe_path"] == 3
    # the human summary: counts by kind, examples, where the full list is; no traceback
    err = ours(capsys.readouterr().err, "Check dataset failed")
    assert "12 problem(s) found:" in err and "unsafe_path" in err and "train.txt:11" in err
    assert err.rstrip().endswith("check_dataset/errors.jsonl") and "Traceback" not in err
    # the full list, one JSON object a line, names every problem the result names
    lines = (tmp_path / "out" / "check_dataset" / "errors.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == report["errors"]
    assert report["errors_file"] == "check_dataset/errors.jsonl"
    # checking never touches the dataset
    assert tree_digest(broken) == before


@pytest.mark.parametrize("label_txt, line, reason", [
    ("0 cat\n1 dog\n1 bird\n", 3, "class id 1 repeated (first at line 2)"),
    ("1 cat\n3 dog\n90 bird\n", None, "out of range: 3 (line 2), 90 (line 3); missing 0, 2"),  # PaddleX's COCO
    ("0 cat\n1 dog\n9999999999 bird\n", None, "out of range: 9999999999 (line 3); missing 2"),
])
def test_a_bad_label_file_is_named_without_failing_every_line(ray_start_2_cpus, tmp_path, label_txt, line, reason):
    root = make_mlcls(tmp_path / "ds", NAMES, train=[("images/a.jpg", [1, 0, 0]), ("images/gone.jpg", [0, 1, 0])],
                      val=[("images/b.jpg", [0, 0, 1]), ("images/c.jpg", [1, 1])])
    (root / "images" / "gone.jpg").unlink()
    (root / "label.txt").write_text(label_txt)
    assert run_check(root, tmp_path / "out") == 1
    errors = [(e["file"], e.get("line"), e["kind"], e["reason"]) for e in result(tmp_path / "out")["errors"]]
    # the lists are held to the length most lines agree on, and the images are still decoded
    assert [e[:3] for e in errors] == [("label.txt", line, "label_ids"), ("train.txt", 2, "missing_image"),
                                       ("val.txt", 2, "wrong_length")]
    assert reason in errors[0][3] and "label vector has 2 values, most lines have 3" in errors[2][3]


def test_missing_lists_are_reported_together(ray_start_2_cpus, tmp_path):
    (tmp_path / "ds").mkdir()
    assert run_check(tmp_path / "ds", tmp_path / "out") == 1
    assert [e["file"] for e in result(tmp_path / "out")["errors"]] == ["label.txt", "train.txt", "val.txt"]


def test_odd_but_valid_images_pass(ray_start_2_cpus, tmp_path):
    root = tmp_path / "odd"
    rows = []
    for i, (mode, fmt, color) in enumerate([("L", "PNG", 90), ("RGBA", "PNG", (1, 2, 3, 0)), ("CMYK", "JPEG", 0),
                                            ("P", "GIF", 3), ("I;16", "PNG", 40000), ("LA", "PNG", (9, 9))]):
        write_image(root / f"images/{i}.{fmt.lower()}", mode=mode, fmt=fmt, color=color)
        rows.append((f"images/{i}.{fmt.lower()}", [i % 2, 1, 0]))
    make_mlcls(root, NAMES, train=rows[:4], val=rows[4:], make_images=False)
    assert run_check(root, tmp_path / "out") == 0
    report = result(tmp_path / "out")
    assert report["check_pass"] is True and report["errors"] == []
    assert report["attributes"]["train_samples"] == 4 and report["attributes"]["val_samples"] == 2


def test_report_has_paddlex_fields_and_the_extra_analysis(ray_start_2_cpus, tmp_path):
    root = generate(tmp_path / "demo", 120, seed=2)
    assert run_check(root, tmp_path / "out") == 0
    report = result(tmp_path / "out")
    assert {"done_flag", "check_pass", "dataset_path", "show_type", "dataset_type", "attributes", "analysis"} <= set(
        report)
    a = report["attributes"]
    assert report["dataset_type"] == "MLClsDataset" and report["show_type"] == "image"
    assert a["num_classes"] == 8 and a["train_samples"] + a["val_samples"] == 120
    assert not os.path.isabs(a["label_file"])  # relative to <output>/check_dataset, as PaddleX writes it
    assert (tmp_path / "out" / "check_dataset" / a["label_file"]).resolve() == (root / "label.txt").resolve()
    for p in a["train_sample_paths"] + a["val_sample_paths"]:
        assert Image.open(tmp_path / "out" / p).width >= 256  # upscaled so the label strip can be read
    assert len(a["train_sample_paths"]) == 10 and len(a["val_sample_paths"]) == 10
    analysis = report["analysis"]
    for png in (analysis["histogram"], analysis["cooccurrence"]):
        assert (tmp_path / "out" / png).read_bytes()[:4] == b"\x89PNG"
    counts = {c["name"]: c for c in analysis["class_counts"]}
    train_lines = (root / "train.txt").read_text().splitlines()
    assert counts["circle"]["train"] == sum(line.split("\t")[1].split(",")[0] == "1" for line in train_lines)
    with open(tmp_path / "out" / analysis["class_counts_file"], newline="") as f:  # every class, beside the report
        assert [{k: (v if k == "name" else int(v)) for k, v in row.items()} for row in csv.DictReader(f)] == list(
            counts.values())
    assert analysis["top_cooccurring_pairs"]["exact"]  # 8 classes: every pair counted
    assert analysis["images_without_labels"]["train"] == sum(
        set(line.split("\t")[1].split(",")) == {"0"} for line in train_lines)
    assert 0 <= analysis["class_ratio_drift"]["max_abs_diff"] <= 1
    assert analysis["image_sizes"]["count"] == 120
    assert 64 <= analysis["image_sizes"]["width"]["min"] <= analysis["image_sizes"]["width"]["max"] <= 128
    assert (tmp_path / "out" / "config.yaml").read_text().count("dataset_dir") == 2  # header + value


def test_local_and_s3_give_the_same_report(ray_start_2_cpus, s3_bucket, tmp_path):
    root = generate(tmp_path / "demo", 60, seed=4)
    (root / "images" / "000003.jpg").write_bytes(b"broken")  # so the error lists are compared too
    upload_tree(root, f"{s3_bucket}/datasets/demo")
    assert run_check(root, tmp_path / "local_out") == 1
    assert run_check(f"{s3_bucket}/datasets/demo", f"{s3_bucket}/runs/check") == 1
    local = result(tmp_path / "local_out")
    import boto3

    bucket = s3_bucket[len("s3://"):]
    remote = json.loads(boto3.client("s3").get_object(Bucket=bucket, Key="runs/check/check_dataset_result.json")[
        "Body"].read())
    assert remote["dataset_path"] == f"{s3_bucket}/datasets/demo"
    assert remote["attributes"].pop("label_file") == f"{s3_bucket}/datasets/demo/label.txt"
    local["attributes"].pop("label_file")
    for r in (local, remote):
        r.pop("dataset_path")
    assert remote == local
    assert remote["errors"][0]["path"] == "images/000003.jpg"
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="runs/check/")["Contents"]}
    assert {"runs/check/config.yaml", "runs/check/check_dataset/histogram.png"} <= keys


def test_convert_and_split_then_check_through_the_job_script(tmp_path):
    """What `make demo` and `ray job submit ... jobs/check_dataset.py` run, in a fresh process with its own Ray."""
    root = generate(tmp_path / "demo", 200, seed=3)
    for name in ("label.txt", "train.txt", "val.txt"):
        (root / name).unlink()  # only COCO annotations left, as a Labelme/CVAT export would be
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs/check_dataset.py"), "-c", "PP-HGNetV2-B0_ML",
         "-o", f"Global.dataset_dir={root}", "-o", f"Global.output={tmp_path / 'out'}",
         "-o", "Global.mode=train",  # the job script fixes the mode, whatever is passed
         "-o", "CheckDataset.convert.enable=True", "-o", "CheckDataset.convert.src_dataset_type=COCO",
         "-o", "CheckDataset.split.enable=True", "-o", "CheckDataset.split.train_percent=75",
         "-o", "CheckDataset.split.val_percent=25"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Check dataset passed!" in proc.stdout
    report = result(tmp_path / "out")
    assert report["attributes"]["train_samples"] + report["attributes"]["val_samples"] == 200
    assert report["attributes"]["val_samples"] == 50
    assert not (root / "train.txt.bak").exists()  # convert + split is one replacement, and nothing was there before
    assert (root / "label.txt").read_text().startswith("0 circle\n")


def test_unreadable_lists_are_problems_not_crashes(ray_start_2_cpus, tmp_path):
    root = make_mlcls(tmp_path / "ds", NAMES, train=[("images/a.jpg", [1, 0, 0])], val=[("images/b.jpg", [0, 0, 1])])
    (root / "label.txt").write_bytes(b"0 caf\xe9\n1 dog\n2 bird\n")  # Latin-1, not UTF-8
    (root / "val.txt").unlink()
    (root / "val.txt").mkdir()
    assert run_check(root, tmp_path / "out") == 1
    errors = result(tmp_path / "out")["errors"]
    assert [(e["file"], e["kind"]) for e in errors] == [("label.txt", "unreadable_file"),
                                                        ("val.txt", "unreadable_file")]
    assert "not UTF-8 text" in errors[0]["reason"]


def test_a_failing_run_leaves_paddlex_failure_record_and_one_line(ray_start_2_cpus, tmp_path, capsys):
    root = generate(tmp_path / "demo", 30, seed=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "check_dataset").write_text("a file where the report's folder must go")
    assert run_check(root, out) == 1
    assert result(out)["done_flag"] is False and result(out)["err_type"] == "StorageError"
    err = ours(capsys.readouterr().err, "mlcls: check_dataset failed: StorageError:")
    assert len(err.splitlines()) == 2 and "Traceback" not in err


def test_empty_lists_do_not_pass(ray_start_2_cpus, tmp_path):
    root = make_mlcls(tmp_path / "ds", NAMES, train=[("images/a.jpg", [1, 0, 0])], val=[])
    assert run_check(root, tmp_path / "out") == 1
    assert [(e["file"], e["kind"]) for e in result(tmp_path / "out")["errors"]] == [("val.txt", "empty_list")]


def test_a_folder_in_place_of_an_image_is_unreadable(ray_start_2_cpus, tmp_path):
    root = make_mlcls(tmp_path / "ds", NAMES, train=[("images/a.jpg", [1, 0, 0])], val=[("images/b.jpg", [0, 0, 1])])
    (root / "images" / "b.jpg").unlink()
    (root / "images" / "b.jpg").mkdir()
    assert run_check(root, tmp_path / "out") == 1
    (error,) = result(tmp_path / "out")["errors"]
    assert (error["file"], error["line"], error["kind"]) == ("val.txt", 1, "unreadable_file")


def test_a_file_over_the_size_cap_is_refused_before_it_is_read(ray_start_2_cpus, tmp_path):
    root = make_mlcls(tmp_path / "ds", NAMES, train=[("images/a.jpg", [1, 0, 0])], val=[("images/b.jpg", [0, 0, 1])])
    big = root / "images" / "b.jpg"
    with open(big, "ab") as f:
        f.truncate(5_000_000)  # a valid JPEG followed by 5 MB of padding; sparse, so nothing is really written
    assert run_check(root, tmp_path / "out", "Global.max_file_bytes=1000000") == 1
    (error,) = result(tmp_path / "out")["errors"]
    assert (error["file"], error["line"], error["kind"]) == ("val.txt", 1, "file_too_large")
    assert error["reason"] == "5,000,000 bytes, over the limit of 1,000,000 (raise Global.max_file_bytes)"


def test_the_result_keeps_the_first_errors_and_the_errors_file_has_all(ray_start_2_cpus, tmp_path, monkeypatch):
    from mlcls_ray.data import check

    monkeypatch.setattr(check, "MAX_ERRORS_IN_RESULT", 3)
    rows = [(f"images/{i}.jpg", [1, 0, 0]) for i in range(8)]
    root = make_mlcls(tmp_path / "ds", NAMES, train=rows[:5], val=rows[5:], make_images=False)
    write_image(root / "images" / "2.jpg")
    assert run_check(root, tmp_path / "out") == 1
    report = result(tmp_path / "out")
    assert report["error_counts"] == {"missing_image": 7}
    assert [(e["file"], e["line"]) for e in report["errors"]] == [("train.txt", 1), ("train.txt", 2), ("train.txt", 4)]
    everything = [json.loads(line) for line in (tmp_path / "out" / report["errors_file"]).read_text().splitlines()]
    assert [(e["file"], e["line"]) for e in everything] == [
        ("train.txt", 1), ("train.txt", 2), ("train.txt", 4), ("train.txt", 5), ("val.txt", 1), ("val.txt", 2),
        ("val.txt", 3)]


def test_a_thin_tall_image_passes_and_gets_a_demo_image(ray_start_2_cpus, tmp_path):
    root = make_mlcls(tmp_path / "ds", NAMES, train=[("images/a.jpg", [1, 0, 0])], val=[("images/b.jpg", [0, 1, 0])])
    write_image(root / "images" / "a.jpg", size=(100, 26_000))
    assert run_check(root, tmp_path / "out") == 0
    (demo,) = result(tmp_path / "out")["attributes"]["train_sample_paths"]
    assert max(Image.open(tmp_path / "out" / demo).size) < 65_535


def test_convert_and_split_run_twice_change_nothing_the_second_time(ray_start_2_cpus, tmp_path):
    root = generate(tmp_path / "demo", 150, seed=8)
    for name in ("label.txt", "train.txt", "val.txt"):
        (root / name).unlink()
    args = ("CheckDataset.convert.enable=True", "CheckDataset.convert.src_dataset_type=COCO",
            "CheckDataset.split.enable=True", "CheckDataset.split.train_percent=80",
            "CheckDataset.split.val_percent=20")
    assert run_check(root, tmp_path / "out1", *args) == 0
    first = tree_digest(root)
    assert run_check(root, tmp_path / "out2", *args) == 0
    assert tree_digest(root) == first  # no image moved between train and val, no backup piled up
    assert len((root / "val.txt").read_text().splitlines()) == 30


def test_a_failure_inside_a_ray_task_is_one_line(ray_start_2_cpus):
    import ray

    from mlcls_ray.cli import root_cause

    @ray.remote
    def task():
        raise KeyError("no such class")

    def udf(batch):
        raise ValueError("bad pixels in block 3")

    with pytest.raises(Exception) as direct:
        ray.get(task.remote())
    with pytest.raises(Exception) as data:
        ray.data.range(4).map_batches(udf).take_all()
    assert root_cause(direct.value) == "KeyError: 'no such class'"
    assert root_cause(data.value) == "ValueError: bad pixels in block 3"
    assert len(str(data.value).splitlines()) > 3  # what used to be printed as the "one line"


def test_every_problem_is_reported_the_same_on_s3(ray_start_2_cpus, broken, s3_bucket, tmp_path):
    (broken / "images" / "link.jpg").unlink()  # S3 has no symlinks: line 13 becomes a missing image on both sides
    upload_tree(broken, f"{s3_bucket}/broken")
    assert run_check(broken, tmp_path / "local", "Global.max_image_pixels=1000000") == 1
    assert run_check(f"{s3_bucket}/broken", f"{s3_bucket}/out", "Global.max_image_pixels=1000000") == 1
    local = result(tmp_path / "local")["errors"]
    bucket = s3_bucket[len("s3://"):]
    import boto3

    remote = json.loads(boto3.client("s3").get_object(Bucket=bucket, Key="out/check_dataset_result.json")["Body"]
                        .read())["errors"]
    expected = [(f, line, kind) for f, line, kind, _ in EXPECTED[:-1]] + [("train.txt", 13, "missing_image")]
    assert [(e["file"], e["line"], e["kind"]) for e in local] == expected
    assert [(e["file"], e["line"], e["kind"]) for e in remote] == expected


def test_when_a_split_after_conversion_is_stopped_the_check_names_why(ray_start_2_cpus, tmp_path):
    root = generate(tmp_path / "demo", 40, seed=9)
    for name in ("label.txt", "train.txt", "val.txt"):
        (root / name).unlink()
    (root / "images" / "000001.jpg").write_bytes(b"broken")
    for split in ("train", "val"):  # two categories with one name: label.txt will repeat it, which stops the split
        ann = root / "annotations" / f"instance_{split}.json"
        coco = json.loads(ann.read_text())
        coco["categories"][1]["name"] = coco["categories"][0]["name"]
        ann.write_text(json.dumps(coco))
    assert run_check(root, tmp_path / "out", "CheckDataset.convert.enable=True",
                     "CheckDataset.convert.src_dataset_type=COCO", "CheckDataset.split.enable=True",
                     "CheckDataset.split.train_percent=80", "CheckDataset.split.val_percent=20") == 1
    report = result(tmp_path / "out")
    assert report["error_counts"] == {"label_ids": 1, "split_skipped": 1, "not_an_image": 1}
    assert [(e["file"], e.get("line"), e["kind"]) for e in report["errors"][:2]] == [
        ("label.txt", None, "split_skipped"), ("label.txt", 2, "label_ids")]
    assert report["errors"][1]["reason"] == "class name 'circle' repeated (first at line 1)"
    assert (root / "label.txt").read_text().startswith("0 circle\n1 circle\n")  # the conversion was kept
