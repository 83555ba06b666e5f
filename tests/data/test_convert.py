"""COCO -> MLClsDataset: positional 0-based ids, unannotated images kept, mismatches named, nothing lost."""

import json

import pytest

from mlcls_ray.data.convert import convert_coco
from tests.helpers import write_image

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
        ("missing_image", "annotations/instance_train.json", "images/gone.jpg")]


def test_annotations_are_never_modified_and_old_lists_are_backed_up(dataset):
    before = {p.name: p.read_bytes() for p in (dataset / "annotations").iterdir()}
    (dataset / "train.txt").write_text("old train\n")
    convert_coco(str(dataset))
    convert_coco(str(dataset))
    assert {p.name: p.read_bytes() for p in (dataset / "annotations").iterdir()} == before
    assert (dataset / "train.txt.bak").read_text() == "old train\n"
    assert (dataset / "train.txt.bak.1").read_text().startswith("images/a.jpg\t")
    assert (dataset / "label.txt.bak").exists() and (dataset / "val.txt.bak").exists()


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
    assert reasons == ["annotation 'not an object' is not an object",
                       "annotation 99 has category_id 42, not in 'categories'"]
