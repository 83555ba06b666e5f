"""Training on a real local Ray (2 CPUs, gloo): outputs, resume and evaluate. DDP and resume exactness are in
test_train_exact.py; node loss, S3 data and S3 outputs in tests/cluster/test_multinode.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mlcls_ray import storage
from mlcls_ray.cli import main
from mlcls_ray.data.images import decode_image
from mlcls_ray.data.mlcls_format import read_dataset
from mlcls_ray.data.problems import ProblemLog
from mlcls_ray.infer.predictor import Predictor
from mlcls_ray.metrics import average_precision, mean_average_precision
from mlcls_ray.train import evaluate
from mlcls_ray.train.run import latest_checkpoint
from tests.helpers import make_quadrants

pytestmark = pytest.mark.usefixtures("ray_start_2_cpus")

_MODEL = "test_resnet_ML"  # timm's tiny test network, through the generic <timm model>_ML recipe
_ARCH = ["Arch.embed_dim=64", "Arch.ffn_dim=128", "Arch.num_heads=2"]


@pytest.fixture(scope="module")
def quadrants(tmp_path_factory) -> Path:
    return make_quadrants(tmp_path_factory.mktemp("data") / "quadrants", num_train=256, num_val=128)


def _train(root: str, output: str, *overrides: str) -> int:
    settings = ["Global.mode=train", f"Global.dataset_dir={root}", f"Global.output={output}", "Global.device=cpu",
                "Train.image_size=32", "Train.batch_size=16", "Train.num_workers=2", "Train.learning_rate=0.003",
                "Train.warmup_steps=0", "Train.augment=none", "Train.pretrain_weight_path=None", "Train.log_interval=4",
                *_ARCH, *overrides]
    return main(["-c", _MODEL, *[a for s in settings for a in ("-o", s)]])


def _result(output: str, name: str = "train_result.json") -> dict:
    return json.loads(storage.read_text(storage.join(output, name)))


@pytest.fixture(scope="module")
def two_epochs(quadrants, tmp_path_factory) -> Path:
    """A finished run of 2 epochs, every epoch saved; the outputs test reads it, the resume test goes on from a copy
    (each Ray Train run costs half a minute of start-up here)."""
    folder = tmp_path_factory.mktemp("two_epochs")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)  # a relative Global.output means the driver's folder, not a Ray worker's
        assert _train(str(quadrants), "out", "Train.epochs_iters=2", "Train.save_interval=1") == 0
    return folder / "out"


def test_outputs_follow_paddlex_and_the_model_folder_reproduces_evaluate(quadrants, two_epochs, monkeypatch):
    monkeypatch.chdir(two_epochs.parent)
    out = two_epochs
    result = _result(str(out))
    assert result["done_flag"] is True and result["model_name"] == _MODEL
    best = result["models"]["best"]
    assert (out / best["inference_config"]).is_file() and (out / best["safetensors"]).is_file()
    assert [result["models"][k]["epoch"] for k in ("last_1", "last_2")] == [2, 1]
    assert (out / result["models"]["last_1"]["checkpoint"] / "state.pt").is_file()
    for name in ("train.log", "config.yaml", "curves.png", "label_dict.txt"):
        assert (out / name).is_file(), name
    log = (out / "train.log").read_text()
    assert "[Eval][Epoch 2][Avg] MultiLabelMAP(integral): " in log and "ETA" in log
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))

    monkeypatch.setattr(evaluate, "_BLOCK_BYTES", 1)  # one class a block task, as 20k classes are split
    assert main(["-c", _MODEL, "-o", "Global.mode=evaluate", "-o", f"Global.dataset_dir={quadrants}",
                 "-o", "Global.output=out", "-o", "Global.device=cpu"]) == 0
    evaluated = _result(str(out), "evaluate_result.json")
    assert not (out / "_evaluate_scores").exists()  # the scratch scores are gone
    assert evaluated["done_flag"] is True and evaluated["images"] == 128
    assert evaluated["metrics"]["MultiLabelMAP"] == pytest.approx(best["score"], abs=1e-4)
    assert set(evaluated["metrics"]["per_class_AP"]) == {"top_left", "top_right", "bottom_left", "bottom_right"}
    assert (out / "pr_curve.png").stat().st_size > 1000

    # the folder alone, through the Predictor: the same preprocessing as training's validation
    predictor = Predictor(str(out / "best_model"))
    with ProblemLog() as problems:
        _, manifest = read_dataset(str(quadrants), problems, files=("val.txt",))
    images = [decode_image(storage.read_bytes(f"{quadrants}/{p}")) for p in manifest.paths.to_pylist()]
    labels = manifest.labels(np.arange(len(manifest)))
    logits = predictor.logits(predictor.preprocess(images))
    assert mean_average_precision(logits, labels) == pytest.approx(best["score"], abs=1e-4)
    ap = dict(zip(predictor.info.label_names, average_precision(logits, labels)))
    assert evaluated["metrics"]["per_class_AP"] == pytest.approx(ap, abs=1e-5)  # each block at its own classes


def test_resume_path_latest_continues_a_finished_run(quadrants, two_epochs, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(two_epochs, out)  # the finished 2-epoch run, moved: its checkpoints are found under the new path
    first = latest_checkpoint(str(out))
    assert first is not None and first.startswith(str(out)) and first.endswith("epoch_2")
    assert _train(str(quadrants), str(out), "Train.epochs_iters=3", "Train.resume_path=latest") == 0
    log = (out / "train.log").read_text()
    assert f"epochs 3-3, resumed from {first}" in log
    assert "[Train][Epoch 2/2][Avg]" in log  # the first run's lines are kept...
    assert "[Train][Epoch 1/3]" not in log and "[Train][Epoch 2/3]" not in log  # ...epochs 1-2 are not retrained
    assert "[Train][Epoch 3/3][Avg]" in log
    assert latest_checkpoint(str(out)).endswith("epoch_3")
    assert _train(str(quadrants), str(out), "Train.epochs_iters=3", "Train.resume_path=latest") == 1  # nothing to do
    assert _result(str(out))["err_msg"].endswith("has trained 3 epochs and Train.epochs_iters is 3; raise "
                                                 "Train.epochs_iters to train on")


def test_resume_path_that_is_not_a_checkpoint_is_a_clear_error(quadrants, tmp_path, capsys):
    out = tmp_path / "out"
    assert _train(str(quadrants), str(out), "Train.resume_path=latest") == 1
    assert "Train.resume_path=latest: no checkpoint under" in capsys.readouterr().err
    failure = _result(str(out))
    assert failure["done_flag"] is False and failure["err_type"] == "TrainSetupError"
    assert failure["err_msg"].startswith("TrainSetupError: Train.resume_path=latest: no checkpoint under")


def test_too_many_cpus_per_worker_is_refused_before_it_can_hang(quadrants, tmp_path, capsys):
    assert _train(str(quadrants), str(tmp_path / "out"), "Train.cpus_per_worker=1") == 1
    assert "leaves less than 1 to decode images" in capsys.readouterr().err


def test_gpu_training_without_gpus_says_so(quadrants, tmp_path, capsys):
    assert _train(str(quadrants), str(tmp_path / "out"), "Global.device=gpu:0,1") == 1
    assert "Global.device=gpu:0,1 asks for 2 GPU worker(s), but the Ray cluster has 0 GPU(s)" in capsys.readouterr().err
