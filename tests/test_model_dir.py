"""The model folder: a save/load round trip, PaddleX's inference.yml layout, and readable errors for bad folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from mlcls_ray import model_dir
from mlcls_ray.models.zoo import ModelSpec, build_model

NAMES = ["cat", "dog", "bird"]
THRESHOLDS = [0.5, 0.25, 0.75]


def _spec(num_classes: int = 3) -> ModelSpec:
    return ModelSpec.create(name="tiny_ML", backbone="test_resnet", tap="features", num_classes=num_classes,
                            image_size=32, embed_dim=32, ffn_dim=64, num_heads=2)


@pytest.fixture
def saved(tmp_path) -> tuple[Path, torch.nn.Module]:
    """A trained-looking model folder and the model it was saved from (eval mode)."""
    torch.manual_seed(0)
    model, _ = build_model(_spec())
    with torch.no_grad():  # move the head off its init, so a load that skipped it would show
        model.head.group_bias.normal_()
    folder = tmp_path / "best_model"
    model_dir.save(str(folder), _spec(), model.state_dict(), NAMES, THRESHOLDS, extra={"epoch": 3, "mAP": 0.5})
    return folder, model.eval()


def _edit_yml(folder: Path, change) -> None:
    path = folder / model_dir.CONFIG_FILE
    doc = yaml.safe_load(path.read_text())
    change(doc)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def test_round_trip_gives_the_same_logits(saved):
    folder, model = saved
    assert sorted(p.name for p in folder.iterdir()) == ["inference.yml", "model.safetensors"]
    loaded, info = model_dir.load(str(folder))
    assert not loaded.training
    assert info.spec == _spec() and info.label_names == NAMES and info.thresholds == THRESHOLDS
    assert info.extra == {"epoch": 3, "mAP": 0.5}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_inference_yml_has_paddlex_layout(saved):
    folder, _ = saved
    doc = yaml.safe_load((folder / "inference.yml").read_text())
    assert doc["Global"]["model_name"] == "tiny_ML"
    ops = doc["PreProcess"]["transform_ops"]
    assert [next(iter(op)) for op in ops] == ["ResizeImage", "NormalizeImage", "ToCHWImage"]
    assert ops[0]["ResizeImage"]["size"] == [32, 32]
    norm = ops[1]["NormalizeImage"]
    assert norm["mean"] == list(_spec().mean) and norm["std"] == list(_spec().std)
    assert norm["scale"] == pytest.approx(1 / 255)
    post = doc["PostProcess"]["MultiLabelThreshOutput"]
    assert post == {"threshold": THRESHOLDS, "label_list": NAMES}
    assert doc["Model"]["backbone"] == "test_resnet" and doc["Model"]["num_classes"] == 3
    # the PreProcess ops are the one place these live, so an edit there cannot disagree with a copy
    assert not {"image_size", "mean", "std"} & set(doc["Model"])


def test_preprocess_in_the_folder_is_authoritative(saved):
    folder, _ = saved
    ops = lambda doc: doc["PreProcess"]["transform_ops"]  # noqa: E731
    _edit_yml(folder, lambda doc: ops(doc)[1]["NormalizeImage"].update(mean=[0.1, 0.2, 0.3]))
    assert model_dir.read_info(str(folder)).spec.mean == (0.1, 0.2, 0.3)
    model, _ = model_dir.load(str(folder))
    assert model.spec.mean == (0.1, 0.2, 0.3)


def test_one_paddlex_threshold_applies_to_every_class(saved):
    folder, _ = saved
    _edit_yml(folder, lambda doc: doc["PostProcess"]["MultiLabelThreshOutput"].update(threshold=0.5))
    assert model_dir.read_info(str(folder)).thresholds == [0.5, 0.5, 0.5]


def test_folder_without_inference_yml(tmp_path):
    with pytest.raises(ValueError, match="is not a model folder") as err:
        model_dir.read_info(str(tmp_path / "nothing_here"))
    assert str(tmp_path / "nothing_here") in str(err.value)


@pytest.mark.parametrize("text, expect", [
    ("Global:\n  model: ResNet50_ML\nTrain:\n  epochs_iters: 3\n", "not a model folder written by mlcls"),
    ("- just\n- a list\n", "not a model folder written by mlcls"),
    ("Global: [unclosed\n", "not valid YAML"),
])
def test_yml_that_is_not_a_model_folder(tmp_path, text, expect):
    (tmp_path / "inference.yml").write_text(text)
    with pytest.raises(ValueError, match=expect) as err:
        model_dir.load(str(tmp_path))
    assert str(tmp_path / "inference.yml") in str(err.value)


@pytest.mark.parametrize("change, expect", [
    (lambda doc: doc["PostProcess"]["MultiLabelThreshOutput"].update(label_list=["cat", "dog"]),
     "3 classes, but 2 labels and 3 thresholds"),
    (lambda doc: doc["PostProcess"]["MultiLabelThreshOutput"].update(threshold=[0.5]),
     "3 classes, but 3 labels and 1 thresholds"),
    (lambda doc: doc["PostProcess"]["MultiLabelThreshOutput"].update(threshold=None), "not a model folder"),
    (lambda doc: doc["Model"].update(colour="blue"), "unknown model fields"),
    (lambda doc: doc["Model"].update(backbone="no_such_net"), "its Model section does not build"),
])
def test_inconsistent_yml_names_it(saved, change, expect):
    folder, _ = saved
    _edit_yml(folder, change)
    with pytest.raises(ValueError, match=expect) as err:
        model_dir.load(str(folder))
    assert str(folder / "inference.yml") in str(err.value)


def test_weights_of_another_class_count(saved):
    folder, _ = saved
    _edit_yml(folder, lambda doc: (doc["Model"].update(num_classes=4),
                                   doc["PostProcess"]["MultiLabelThreshOutput"].update(
                                       threshold=THRESHOLDS + [0.5], label_list=NAMES + ["fish"])))
    with pytest.raises(ValueError, match="cannot load the weights") as err:
        model_dir.load(str(folder))
    assert str(folder / "model.safetensors") in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing"])
def test_broken_weights_give_value_error(saved, damage):
    folder, _ = saved
    weights = folder / "model.safetensors"
    if damage == "garbage":
        weights.write_bytes(b"not a safetensors file" * 4)
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        weights.unlink()
    with pytest.raises(ValueError, match="cannot load the weights") as err:
        model_dir.load(str(folder))
    assert str(weights) in str(err.value)


def test_save_refuses_counts_that_disagree_with_the_spec(tmp_path):
    model, _ = build_model(_spec())
    with pytest.raises(ValueError, match="3 classes, but 2 names and 3 thresholds"):
        model_dir.save(str(tmp_path / "m"), _spec(), model.state_dict(), NAMES[:2], THRESHOLDS)
    assert not (tmp_path / "m").exists()
