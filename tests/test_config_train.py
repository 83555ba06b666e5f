"""Config keys of training and evaluation: modes, augment, the learning-rate warning, workers, every shipped YAML."""

from __future__ import annotations

import pytest

from mlcls_ray.config import SCHEMA, ConfigError, list_presets, load_config


def _load(*overrides: str):
    return load_config("ResNet50_ML", list(overrides), check_paths=False)


@pytest.mark.parametrize("mode", ["train", "evaluate"])
def test_train_and_evaluate_are_modes(mode):
    assert _load(f"Global.mode={mode}")["Global.mode"] == mode


@pytest.mark.parametrize("text, value", [("None", None), ("null", None), ("ml_decoder", "ml_decoder"),
                                         ("light", "light")])
def test_augment_choices(text, value):
    assert _load(f"Train.augment={text}")["Train.augment"] == value  # None: resize only


def test_bogus_augment_is_refused_with_the_choices():
    with pytest.raises(ConfigError) as err:
        _load("Train.augment=bogus")
    assert err.value.problems == ["Train.augment: 'bogus' is not allowed; choose one of: ml_decoder, light, or None"]


def test_sgd_scale_learning_rate_loads_with_one_warning():
    cfg = _load("Train.learning_rate=0.05")
    assert cfg["Train.learning_rate"] == 0.05
    assert len(cfg.warnings) == 1 and "\n" not in cfg.warnings[0]
    assert "Train.learning_rate=0.05" in cfg.warnings[0] and "PaddleClas #3290" in cfg.warnings[0]
    assert _load("Train.learning_rate=1e-4").warnings == []


def test_zero_workers_is_refused():
    with pytest.raises(ConfigError) as err:
        _load("Train.num_workers=0")
    assert err.value.problems[0].startswith("Train.num_workers: 0 is out of range (at least 1)")
    assert _load("Train.num_workers=2")["Train.num_workers"] == 2
    assert _load("Train.num_workers=None")["Train.num_workers"] is None  # from Global.device


@pytest.mark.parametrize("name", list_presets() + ["resnet18_ML"])  # resnet18_ML: the _timm_ML recipe
def test_every_shipped_yaml_loads(name):
    cfg = load_config(name, check_paths=False)
    assert set(cfg.values) == set(SCHEMA) and cfg["Global.model"] == name and cfg.warnings == []
    assert cfg["Train.augment"] == "ml_decoder" and cfg["Global.mode"] == "check_dataset"


@pytest.mark.parametrize(("device", "count"), [("cpu", 1), ("gpu", 1), ("gpu:3", 1), ("gpu:0,1", 2),
                                               ("gpu:0,1,2,3", 4)])
def test_paddlex_device_names_count_their_devices(device, count):
    from mlcls_ray.config import device_count

    assert device_count(device) == count
