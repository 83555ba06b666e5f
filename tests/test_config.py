"""The config system: presets, -o overrides, and one-line errors with exit code 2."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mlcls_ray.cli import main
from mlcls_ray.config import SCHEMA, ConfigError, _coerce, _packaged, list_presets, load_config
from mlcls_ray.data.synthetic import generate

PRESETS = ["CLIP_vit_base_patch16_448_ML", "PP-HGNetV2-B0_ML", "PP-HGNetV2-B4_ML", "PP-HGNetV2-B6_ML",
           "PP-LCNet_x1_0_ML", "ResNet50_ML"]


def test_the_six_presets_ship():
    assert list_presets() == sorted(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_sets_every_key_and_names_itself(preset):
    cfg = load_config(preset, check_paths=False)
    assert set(cfg.values) == set(SCHEMA)
    assert cfg["Global.model"] == preset
    assert cfg["Global.output"] == "output"
    # PaddleX's module yamls use SGD-sized rates (0.05-0.1) with AdamW; ours stay at PaddleClas's 1e-4 or below
    assert cfg["Train.learning_rate"] <= 1e-4


@pytest.mark.parametrize("preset", PRESETS)
def test_a_preset_file_holds_only_what_differs_from_the_base(preset):
    base, own = _packaged("_timm_ML"), _packaged(preset)
    named = {"Global.model", "Arch.backbone"}  # null in the base: each preset names its own
    assert set(base) == set(SCHEMA) and named <= set(own) <= set(base)
    same = [k for k, v in own.items() if k not in named and _coerce(k, v) == _coerce(k, base[k])]
    assert same == [], f"{preset}.yaml repeats the base's values of {same}; delete them"


def test_overrides_parse_as_yaml_scalars(tmp_path):
    cfg = load_config("ResNet50_ML", [
        f"Global.dataset_dir={tmp_path}", "CheckDataset.convert.enable=True",
        "CheckDataset.convert.src_dataset_type=COCO", "Train.learning_rate=0.001", "Train.batch_size=8",
        "Train.pretrain_weight_path=None", "Global.device=gpu:0,1",
    ])
    assert cfg["CheckDataset.convert.enable"] is True
    assert cfg["Train.learning_rate"] == 0.001 and cfg["Train.batch_size"] == 8
    assert cfg["Train.pretrain_weight_path"] is None
    assert cfg["Global.device"] == "gpu:0,1"
    assert cfg.overrides["Train.batch_size"] == 8


def test_string_keys_keep_the_text_as_typed(tmp_path):
    cfg = load_config("ResNet50_ML", [f"Global.dataset_dir={tmp_path}", "Global.output=0777", "Predict.input=on",
                                      "Train.pretrain_weight_path=/w/a #1.pt", "Train.learning_rate=1e-4"])
    assert cfg["Global.output"] == "0777" and cfg["Predict.input"] == "on"
    assert cfg["Train.pretrain_weight_path"] == "/w/a #1.pt"
    assert cfg["Train.learning_rate"] == 1e-4


def test_a_paddlex_module_yaml_loads_unchanged(tmp_path):
    """PaddleX 3.0-beta's PP-LCNet_x1_0_ML.yaml, with its dataset path pointed here."""
    path = tmp_path / "PP-LCNet_x1_0_ML.yaml"
    path.write_text(f"""
Global:
  model: PP-LCNet_x1_0_ML
  mode: check_dataset # check_dataset/train/evaluate/predict
  dataset_dir: "{tmp_path}"
  device: gpu:0,1,2,3
  output: "output"
CheckDataset:
  convert:
    enable: False
    src_dataset_type: null
  split:
    enable: False
    train_percent: null
    val_percent: null
Train:
  num_classes: 33
  epochs_iters: 20
  batch_size: 64
  learning_rate: 0.1
  pretrain_weight_path: null
  warmup_steps: 5
  resume_path: null
  log_interval: 1
  eval_interval: 1
  save_interval: 1
Evaluate:
  weight_path: "output/best_model/best_model.pdparams"
  log_interval: 1
Export:
  weight_path: https://paddle-model-ecology.bj.bcebos.com/paddlex/official_pretrained_model/PP-LCNet_x1_0_ML.pdparams
Predict:
  batch_size: 1
  model_dir: "output/best_model/inference"
  input: "https://paddle-model-ecology.bj.bcebos.com/paddlex/imgs/demo_image/general_image_classification_001.jpg"
  kernel_option:
    run_mode: paddle
""")
    cfg = load_config(str(path))
    assert cfg["Train.num_classes"] == 33 and cfg["Global.device"] == "gpu:0,1,2,3"
    assert cfg["CheckDataset.split.seed"] == 0  # keys PaddleX lacks come from the preset
    assert cfg.warnings[0].startswith("Evaluate.log_interval: ignored; a PaddleX key this project has no use for")


def test_a_user_yaml_only_needs_what_it_changes(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(f"Global:\n  model: PP-HGNetV2-B4_ML\n  dataset_dir: {tmp_path}\nTrain:\n  batch_size: 7\n")
    cfg = load_config(str(path), ["Train.epochs_iters=3"])
    assert cfg["Train.batch_size"] == 7 and cfg["Train.epochs_iters"] == 3
    assert cfg["Train.learning_rate"] == load_config("PP-HGNetV2-B4_ML", check_paths=False)["Train.learning_rate"]


@pytest.mark.parametrize("override, message", [
    ("Global.mdoe=check_dataset", "Global.mdoe: unknown key; did you mean Global.mode"),
    ("Global.mode=trian", "Global.mode: 'trian' is not allowed; choose one of: check_dataset"),
    ("Train.batch_size=eight", "Train.batch_size: 'eight' is not a decimal integer"),
    ("Train.epochs_iters=1:30", "Train.epochs_iters: '1:30' is not a decimal integer"),  # YAML 1.1: 90
    ("Train.batch_size=0x10", "Train.batch_size: '0x10' is not a decimal integer"),
    ("Train.batch_size=1_000", "Train.batch_size: '1_000' is not a decimal integer"),
    ("Train.learning_rate=nan", "Train.learning_rate: 'nan' is not a finite decimal number"),
    ("Train.learning_rate=inf", "Train.learning_rate: 'inf' is not a finite decimal number"),
    ("Train.learning_rate=.inf", "Train.learning_rate: '.inf' is not a finite decimal number"),
    ("Global.max_file_bytes=0", "Global.max_file_bytes: 0 is out of range"),
    ("Train.batch_size=0", "Train.batch_size: 0 is out of range"),
    ("Global.max_image_pixels=200000000", "Global.max_image_pixels: 200000000 is out of range"),
    ("CheckDataset.convert.enable=yes please", "CheckDataset.convert.enable: 'yes please' is not a boolean"),
    ("Global.device=tpu", "Global.device: 'tpu' is not allowed; use cpu, gpu or gpu:0,1"),
    ("CheckDataset.convert.src_dataset_type=VOC", "choose one of: COCO"),
    ("Global.dataset_dir=/no/such/dir", "Global.dataset_dir: '/no/such/dir' is not an existing folder"),
    ("CheckDataset.split.enable=True", "train_percent + val_percent: None + None must be 100"),
    ("nodot", "expected Section.key=value"),
    ("Global.model=ResNet50_ML", "Global.model: 'ResNet50_ML' cannot be set with -o"),
])
def test_bad_input_names_the_key_and_what_is_allowed(tmp_path, override, message):
    args = [override] if "dataset_dir" in override else [f"Global.dataset_dir={tmp_path}", override]
    with pytest.raises(ConfigError) as err:
        load_config("PP-LCNet_x1_0_ML", args)
    assert any(message in p for p in err.value.problems), err.value.problems


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config("PP-LCNet_x1_0_ML", ["Train.batch_size=-1", "Global.mode=x", "Foo.bar=1"])
    assert len(err.value.problems) == 3


def test_unknown_preset_suggests_close_names():
    with pytest.raises(ConfigError, match="did you mean PP-LCNet_x1_0_ML"):
        load_config("PP-LCNet_x1_0")


def test_cli_config_error_is_one_line_exit_2_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "mlcls_ray.cli", "-c", "ResNet50_ML", "-o", "Train.batch_size=x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "mlcls: config error: Train.batch_size: 'x' is not a decimal integer (batch size per device)",
        "mlcls: config error: Global.dataset_dir: must be set for check_dataset (a local path or s3://bucket/prefix)"]


def test_resolved_config_is_written_next_to_outputs(ray_start_2_cpus, tmp_path, capsys):
    root = generate(tmp_path / "ds", 20, seed=0)
    out = tmp_path / "out"
    assert main(["-c", "ResNet50_ML", "-o", f"Global.dataset_dir={root}", "-o", f"Global.output={out}",
                 "-o", "Train.batch_size=3", "-o", "CheckDataset.split.seed=010"]) == 0
    dumped = yaml.safe_load((out / "config.yaml").read_text())
    assert dumped["Train"]["batch_size"] == 3 and dumped["CheckDataset"]["split"]["seed"] == 10
    assert dumped["Global"]["model"] == "ResNet50_ML" and dumped["Global"]["dataset_dir"] == str(root)
    assert load_config(str(out / "config.yaml")).values == load_config(
        "ResNet50_ML", [f"Global.dataset_dir={root}", f"Global.output={out}", "Train.batch_size=3",
                        "CheckDataset.split.seed=10"]).values  # the dump loads back to the same config
    assert "override Train.batch_size = 3" in capsys.readouterr().out
    # a config that fails validation runs nothing and writes nothing
    assert main(["-c", "ResNet50_ML", "-o", f"Global.output={tmp_path}/out2", "-o", "Global.dataset_dir=/nope"]) == 2
    assert not (tmp_path / "out2").exists()


def test_numbers_are_decimal_as_typed_on_the_command_line_and_in_files(tmp_path):
    cfg = load_config("ResNet50_ML", [f"Global.dataset_dir={tmp_path}", "Train.batch_size=010"])
    assert cfg["Train.batch_size"] == 10  # YAML 1.1 would read octal 8
    path = tmp_path / "mine.yaml"
    path.write_text(f"Global:\n  model: ResNet50_ML\n  dataset_dir: {tmp_path}\n  output: 0777\n"
                    "Train:\n  batch_size: 010\n  learning_rate: 1e-4\n")
    cfg = load_config(str(path))
    assert cfg["Global.output"] == "0777" and cfg["Train.batch_size"] == 10 and cfg["Train.learning_rate"] == 1e-4
    path.write_text(f"Global:\n  model: ResNet50_ML\n  dataset_dir: {tmp_path}\nTrain:\n  epochs_iters: 1:30\n"
                    "  learning_rate: .nan\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert err.value.problems == [
        "Train.epochs_iters: '1:30' is not a decimal integer (epochs)",
        "Train.learning_rate: '.nan' is not a finite decimal number (AdamW learning rate)"]


def test_a_bad_value_does_not_hide_a_cross_field_problem(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config("PP-LCNet_x1_0_ML", [f"Global.dataset_dir={tmp_path}", "Train.batch_size=-1",
                                         "CheckDataset.split.enable=True", "CheckDataset.convert.enable=True"])
    assert len(err.value.problems) == 3
    assert err.value.problems[0].startswith("Train.batch_size: -1 is out of range")
    assert "src_dataset_type: must be set when convert.enable is True" in err.value.problems[1]
    assert "train_percent + val_percent: None + None must be 100" in err.value.problems[2]


def test_readme_documents_every_key():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert [k for k in SCHEMA if f"`{k}`" not in readme] == []


def test_every_mode_the_config_accepts_has_a_runner():
    import importlib

    from mlcls_ray.cli import MODES as RUNNERS
    from mlcls_ray.config import MODES

    assert set(MODES) == set(RUNNERS)
    for target in RUNNERS.values():
        module, name = target.split(":")
        assert callable(getattr(importlib.import_module(module), name)), target
