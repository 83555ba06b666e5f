"""The product is a model that learns: ``-c resnet18_ML`` at the generic recipe's defaults (its full-size ML-Decoder
head included) must learn a small set all but perfectly. With the head at the backbone's rate, its ReLU projection
died and every image got the same scores (mAP at the classes' prevalence): this test fails on that."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlcls_ray.cli import main
from tests.helpers import make_quadrants

pytestmark = pytest.mark.usefixtures("ray_start_2_cpus")


def test_resnet18_ml_from_scratch_learns_a_small_set(tmp_path: Path):
    root = make_quadrants(tmp_path / "quadrants", num_train=512, num_val=128)
    out = tmp_path / "out"
    settings = [f"Global.dataset_dir={root}", f"Global.output={out}", "Global.mode=train", "Global.device=cpu",
                "Train.num_workers=2", "Train.image_size=32", "Train.batch_size=32", "Train.epochs_iters=5",
                "Train.augment=None", "Train.ema_decay=0", "Train.pretrain_weight_path=None"]
    assert main(["-c", "resnet18_ML", *[a for s in settings for a in ("-o", s)]]) == 0
    best = json.loads((out / "train_result.json").read_text())["models"]["best"]
    assert best["score"] >= 0.95, best
