"""COCO -> MLClsDataset: positional 0-based ids, unannotated images kept, mismatches named, nothing lost."""

import json

import pyarrow.parquet as pq
import pytest

from mlcls_ray.data.convert import convert_coco as _convert
from tests.helpers import write_image


def convert_coco(root):
    problems = []
    return problems, _convert(root, problems)

CATS = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 5, "name": "airplane"}]


def coco(images, annotations, cats=CATS):
    return {"images": [{"id": i, "file_name": f, "width": 40, "height": 32} for i, f in images],
            "annotations": [{"id": k, "image_id": i, "category_id": c, "bbox": [0, 0, 4, 4], "iscrowd": crowd}
                            for k, (i, c, crowd) in enumerate(annotations)],
            "categories": cats}


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "coco"
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg", "v1.jpg"):
        write_image(root / "images" / name)
    train = coco([(1, "a.jpg"), (2, "b.jpg"), (3, "c.jpg"), (4, "gone.jpg")],
                 [(1, 1, 0), (1, 90, 0), (2, 5, 1), (4, 1, 0)])  # c.jpg: no annotation; b.jpg: crowd only
    val = coco([(7, "v1.jpg")], [(7, 5, 0)])
    (root / "annotations").mkdir()
    (root / "annotations" / "instance_train.json").write_text(json.dumps(train))
    (root / "annotations" / "instance_val.json").write_text(json.dumps(val))
    return root


def test_ids_are_positions_by_sorted_category_id(dataset):
    problems, converted = convert_coco(str(dataset))
    assert converted
    assert (dataset / "label.txt").read_text() == "0 person\n1 airplane\n2 toothbrush\n"
    assert (dataset / "train.txt").read_text() == "images/a.jpg\t1,0,1\nimages/b.jpg\t0,1,0\nimages/c.jpg\t0,0,0\n"
    assert (dataset / "val.txt").read_text() == "images/v1.jpg\t0,1,0\n"
    # the image that is in the annotations but not on disk is left out, and reported
    assert [(p.kind, p.file, p.path) for p in problems] == [
        ("missing_image", "annotations/instance_train.json", "gone.jpg")]


def test_annotations_are_never_modified_and_old_lists_are_backed_up(dataset):
    before = {p.name: p.read_bytes() for p in (dataset / "annotations").iterdir()}
    (dataset / "train.txt").write_text("old train\n")
    convert_coco(str(dataset))
    convert_coco(str(dataset))
    assert {p.name: p.read_bytes() for p in (dataset / "annotations").iterdir()} == before
    assert (dataset / "train.txt.bak").read_text() == "old train\n"
    assert not (dataset / "label.txt.bak").exists() and not (dataset / "val.txt.bak").exists()  # none existed
    assert not (dataset / "train.txt.bak.1").exists()  # the second run wrote the same lists: nothing replaced


def test_mismatched_categories_are_named_and_nothing_is_written(dataset):
    val = coco([(7, "v1.jpg")], [], cats=[{"id": 1, "name": "person"}, {"id": 5, "name": "plane"},
                                          {"id": 7, "name": "train"}])
    (dataset / "annotations" / "instance_val.json").write_text(json.dumps(val))
    problems, converted = convert_coco(str(dataset))
    assert not converted and not (dataset / "label.txt").exists()
    (problem,) = problems
    assert problem.kind == "category_mismatch"
    assert "only in annotations/instance_train.json: 90 'toothbrush'" in problem.reason
    assert "only in annotations/instance_val.json: 7 'train'" in problem.reason
    assert "named differently: 5 'airplane' vs 'plane'" in problem.reason


def test_cocos_own_file_names_are_accepted(dataset):
    ann = dataset / "annotations"
    (ann / "instance_train.json").rename(ann / "instances_train2017.json")
    (ann / "instance_val.json").rename(ann / "instances_val2017.json")
    _, converted = convert_coco(str(dataset))
    assert converted and (dataset / "train.txt").exists()


def test_broken_json_names_the_line(dataset):
    (dataset / "annotations" / "instance_val.json").write_text('{"images": [\n  {"id": 1,,}\n]}')
    problems, converted = convert_coco(str(dataset))
    assert not converted
    assert [(p.kind, p.file, p.line) for p in problems] == [("bad_annotations", "annotations/instance_val.json", 2)]


def test_missing_annotations_are_reported(tmp_path):
    (tmp_path / "annotations").mkdir()
    problems, converted = convert_coco(str(tmp_path))
    assert not converted
    assert [p.file for p in problems] == ["annotations/instance_train.json", "annotations/instance_val.json"]


def test_malformed_entries_are_reported_and_the_rest_converted(dataset):
    train = json.loads((dataset / "annotations" / "instance_train.json").read_text())
    train["annotations"] += ["not an object", {"id": 99, "image_id": 1, "category_id": 42}]
    (dataset / "annotations" / "instance_train.json").write_text(json.dumps(train))
    problems, converted = convert_coco(str(dataset))
    assert converted
    reasons = [p.reason for p in problems if p.kind == "bad_annotations"]
    assert reasons == ["annotations[4] = 'not an object': not an object",
                       "annotations[5] (id 99) has category_id 42, not in 'categories'"]


def test_the_coco_2017_layout_finds_its_images(tmp_path):
    """annotations/instances_train2017.json with bare file_names and the images in train2017/ or images/val2017/."""
    root = tmp_path / "coco2017"
    write_image(root / "train2017" / "000000000009.jpg")
    write_image(root / "images" / "val2017" / "000000000139.jpg")
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(
        coco([(9, "000000000009.jpg")], [(9, 1, 0)])))
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(
        coco([(139, "000000000139.jpg")], [(139, 90, 0)])))
    problems, converted = convert_coco(str(root))
    assert converted and problems == []
    assert (root / "train.txt").read_text() == "train2017/000000000009.jpg\t1,0,0\n"
    assert (root / "val.txt").read_text() == "images/val2017/000000000139.jpg\t0,0,1\n"


def test_a_repeated_image_id_is_a_problem_not_a_silent_overwrite(dataset):
    train = json.loads((dataset / "annotations" / "instance_train.json").read_text())
    train["images"].append({"id": 1, "file_name": "d.jpg"})  # a.jpg's id again
    (dataset / "annotations" / "instance_train.json").write_text(json.dumps(train))
    problems, converted = convert_coco(str(dataset))
    assert converted
    assert [p.reason for p in problems if p.kind == "bad_annotations"] == [
        "images[4] repeats image id 1 of images[0]; left out"]
    assert (dataset / "train.txt").read_text().splitlines()[0] == "images/a.jpg\t1,0,1"  # a.jpg keeps its labels


@pytest.mark.parametrize("bad_id", [None, [1], "1", True, 1.5])
def test_ids_that_are_not_integers_are_problems_not_crashes(dataset, bad_id):
    train = json.loads((dataset / "annotations" / "instance_train.json").read_text())
    train["images"].append({"id": bad_id, "file_name": "d.jpg"})
    train["annotations"].append({"id": 50, "image_id": bad_id, "category_id": 1})
    (dataset / "annotations" / "instance_train.json").write_text(json.dumps(train))
    problems, converted = convert_coco(str(dataset))
    assert converted
    reasons = [p.reason for p in problems if p.kind == "bad_annotations"]
    assert len(reasons) == 2
    assert "images[4]" in reasons[0] and "needs an integer id and a file_name" in reasons[0]
    assert "annotations[4] (id 50) refers to image id" in reasons[1]


@pytest.mark.parametrize("name", ["a\tb.jpg", "a\nb.jpg", "/etc/passwd", "../x.jpg", ""])
def test_a_file_name_that_would_break_a_list_line_is_a_problem(dataset, name):
    train = json.loads((dataset / "annotations" / "instance_train.json").read_text())
    train["images"].append({"id": 77, "file_name": name})
    (dataset / "annotations" / "instance_train.json").write_text(json.dumps(train))
    problems, converted = convert_coco(str(dataset))
    assert converted
    assert [p.reason.split(":")[0] for p in problems if p.kind == "bad_annotations"] == ["images[4] (id 77)"]
    assert len((dataset / "train.txt").read_text().splitlines()) == 3  # a, b, c; never a cut or extra line


def test_non_utf8_json_is_a_problem_not_a_crash(dataset):
    (dataset / "annotations" / "instance_val.json").write_bytes(b'{"images": [], "name": "caf\xe9"}')
    problems, converted = convert_coco(str(dataset))
    assert not converted
    assert [(p.kind, p.file, p.reason) for p in problems] == [
        ("bad_annotations", "annotations/instance_val.json", "not UTF-8 text (byte 27)")]


def test_two_image_ids_for_one_file_and_a_multi_line_category_name_are_problems(dataset):
    train = json.loads((dataset / "annotations" / "instance_train.json").read_text())
    train["images"].append({"id": 50, "file_name": "a.jpg"})
    (dataset / "annotations" / "instance_train.json").write_text(json.dumps(train))
    problems, converted = convert_coco(str(dataset))
    assert converted and [p.reason for p in problems if p.kind == "bad_annotations"] == [
        "images[4] (id 50) repeats the file_name of images[0]; left out"]
    for name in ("train", "val"):
        data = json.loads((dataset / "annotations" / f"instance_{name}.json").read_text())
        data["categories"][0]["name"] = "tooth\nbrush"
        (dataset / "annotations" / f"instance_{name}.json").write_text(json.dumps(data))
    problems, converted = convert_coco(str(dataset))
    assert not converted and {p.reason for p in problems} == {
        "categories[0] has name 'tooth\\nbrush': label.txt needs a one-line name"}


def test_parquet_lists_hold_the_same_labels_and_the_text_lists_are_set_aside(dataset):
    (dataset / "train.txt").write_text("old train\n")
    problems = []
    assert _convert(str(dataset), problems, list_format="parquet")
    rows = {s: pq.read_table(dataset / f"{s}.parquet").to_pylist() for s in ("train", "val")}
    assert rows["train"] == [{"path": "images/a.jpg", "labels": [0, 2]}, {"path": "images/b.jpg", "labels": [1]},
                             {"path": "images/c.jpg", "labels": []}]
    assert rows["val"] == [{"path": "images/v1.jpg", "labels": [1]}]
    assert not (dataset / "train.txt").exists() and (dataset / "train.txt.bak").read_text() == "old train\n"
    assert (dataset / "label.txt").read_text() == "0 person\n1 airplane\n2 toothbrush\n"
