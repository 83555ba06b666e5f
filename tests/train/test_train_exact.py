"""Training that must be exact, on a real local Ray (2 CPUs, gloo): one DDP step equals one step of a single
process on the concatenated batch; a resumed run ends where an uninterrupted one does, at the same learning rates
the schedule gives; the bf16, fp16 + GradScaler and channels-last paths run; a checkpoint of another network or
another worker count is handled before any worker starts."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mlcls_ray import storage
from mlcls_ray.cli import main
from mlcls_ray.data.images import decode_image
from mlcls_ray.data.mlcls_format import read_dataset
from mlcls_ray.data.problems import ProblemLog
from mlcls_ray.data.transforms import ModelInput, resize_square
from mlcls_ray.models.loss import build_loss
from mlcls_ray.models.zoo import ModelSpec, build_model
from mlcls_ray.train import checkpoint
from mlcls_ray.train.optim import build_optimizer, cosine_schedule
from mlcls_ray.train.run import latest_checkpoint
from tests.helpers import make_quadrants

pytestmark = pytest.mark.usefixtures("ray_start_2_cpus")

_EXACT = ["Global.mode=train", "Global.device=cpu", "Train.image_size=32", "Train.augment=None",
          "Train.pretrain_weight_path=None", "Arch.embed_dim=32", "Arch.ffn_dim=64", "Arch.num_heads=2",
          "Arch.dropout=0", "Train.learning_rate=0.003", "Train.head_learning_rate=0.001", "Train.seed=3"]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return make_quadrants(tmp_path_factory.mktemp("data") / "small", num_train=32, num_val=16)


def _train(model: str, root: Path, output: Path, *overrides: str) -> int:
    settings = [f"Global.dataset_dir={root}", f"Global.output={output}", *_EXACT, *overrides]
    return main(["-c", model, *[a for s in settings for a in ("-o", s)]])


def _state(output: Path, epoch: int | None = None) -> dict:
    uri = latest_checkpoint(str(output))
    if epoch is not None:
        uri = uri.rsplit("epoch_", 1)[0] + f"epoch_{epoch}"
    return checkpoint.load_state(uri)


def _train_images(root: Path, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    with ProblemLog() as problems:
        _, manifest = read_dataset(str(root), problems, files=("train.txt",))
    images = [resize_square(decode_image(storage.read_bytes(f"{root}/{p}")), size) for p in manifest.paths.to_pylist()]
    return torch.from_numpy(np.stack(images)), torch.from_numpy(manifest.labels(np.arange(len(manifest)))).float()


def test_one_ddp_step_equals_one_step_on_the_concatenated_batch(small, tmp_path):
    """Two workers of 16 images take one step; a single process takes one step on all 32. Without the gradient
    all-reduce, or with both ranks reading the same shard, rank 0's weights differ. The model has no BatchNorm (a
    ViT), so per-rank batch statistics cannot differ from the whole batch's."""
    out = tmp_path / "ddp"
    assert _train("test_vit_ML", small, out, "Train.num_workers=2", "Train.batch_size=16", "Train.epochs_iters=1",
                  "Train.warmup_steps=0", "Train.ema_decay=0", "Train.lr_scheduler=cosine") == 0
    trained = _state(out)["model"]

    spec = ModelSpec.from_dict(checkpoint.read_meta(latest_checkpoint(str(out)))["spec"])
    torch.manual_seed(3)
    model, _ = build_model(spec)
    optimizer = build_optimizer(model, 0.003, 0.001, 1e-4)
    cosine_schedule(optimizer, epochs=1, steps=1, warmup_epochs=0)
    x, y = _train_images(small)
    loss = build_loss("asl")(model(ModelInput(spec.mean, spec.std)(x)), y) / 2  # DDP averages the 2 ranks' sums
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    # Adam's first step moves every weight by about the learning rate along the sign of its gradient; where a
    # gradient is near 0 (a key bias: softmax ignores it) the sign is float noise, so those weights are not compared
    compared = total = 0
    for name, value in model.named_parameters():
        firm = grads[name].abs() > 1e-6
        torch.testing.assert_close(trained[name][firm], value.detach()[firm], rtol=1e-4, atol=1e-6, msg=name)
        compared, total = compared + int(firm.sum()), total + firm.numel()
    assert compared > 0.9 * total


def _lr_at(step: int, epochs: int, steps: int, warmup: int, lr: float = 0.003) -> float:
    """The backbone's learning rate the schedule gives after ``step`` steps."""
    spec = ModelSpec.create(name="t", backbone="test_resnet", tap="features", num_classes=4, image_size=32,
                            embed_dim=32, num_heads=2, ffn_dim=64)
    optimizer = build_optimizer(build_model(spec)[0], lr, 0.001, 1e-4)
    scheduler = cosine_schedule(optimizer, epochs, steps, warmup)
    scheduler.step_update(step)
    return optimizer.param_groups[0]["lr"]


def _flat(state: dict) -> torch.Tensor:
    return torch.cat([v.flatten().double() for v in state.values() if v.is_floating_point()])


_WHOLE = ["Train.num_workers=1", "Train.batch_size=32", "Train.epochs_iters=4", "Train.warmup_steps=1",
          "Train.lr_scheduler=cosine", "Train.ema_decay=0.5"]


@pytest.fixture(scope="module")
def whole(small, tmp_path_factory) -> Path:
    """An uninterrupted run of 4 full-batch epochs of test_resnet_ML; tests read it or copy it, never change it
    (each Ray Train run costs half a minute of start-up here)."""
    out = tmp_path_factory.mktemp("whole") / "whole"
    assert _train("test_resnet_ML", small, out, *_WHOLE) == 0
    return out


def test_a_resumed_run_ends_with_the_weights_and_rates_of_an_uninterrupted_one(small, whole, tmp_path):
    """Full-batch steps (one an epoch) make the data order irrelevant, so a run resumed from epoch 2 of 4 must
    end where the uninterrupted run does: it fails if the model, optimiser, EMA or schedule is not restored.
    Each epoch's recorded rate is the schedule's at that step: it fails if the loop does not step it."""
    resumed = tmp_path / "resumed"
    epoch_2 = latest_checkpoint(str(whole)).rsplit("epoch_", 1)[0] + "epoch_2"
    assert _train("test_resnet_ML", small, resumed, *_WHOLE, f"Train.resume_path={epoch_2}") == 0
    assert "epochs 3-4, resumed from" in (resumed / "train.log").read_text()

    expected, got = _state(whole), _state(resumed)
    assert got["epoch"] == expected["epoch"] == 4
    start = _state(whole, epoch=2)
    for part in ("model", "ema"):
        # equal but for float noise: the batch's rows come in another order in each run, which Adam's normalised
        # steps amplify where a gradient is near 0; a dropped restore is off by about as much as epochs 3-4 moved
        moved = (_flat(expected[part]) - _flat(start[part])).norm()
        off = (_flat(got[part]) - _flat(expected[part])).norm()
        assert off < 0.05 * moved, (part, float(off), float(moved))
    for record, again in zip(expected["history"], got["history"]):
        assert record["lr"] == pytest.approx(_lr_at(record["step"], 4, 1, 1))
        assert again["lr"] == pytest.approx(record["lr"]) and again["step"] == record["step"]
    assert [r["step"] for r in expected["history"]] == [1, 2, 3, 4]


def test_bf16_channels_last_then_fp16_with_a_scaler_on_another_worker_count(small, tmp_path):
    """The GPU's precision paths run on CPU: bf16 autocast with channels-last, then a resume of that checkpoint
    (its GradScaler saved disabled) in fp16 with the scaler enabled, on 2 workers instead of 1, where the schedule
    continues by epochs (1 step an epoch instead of 2)."""
    out = tmp_path / "out"
    assert _train("test_resnet_ML", small, out, "Train.num_workers=1", "Train.batch_size=16", "Train.epochs_iters=1",
                  "Train.precision=bf16", "Train.channels_last=True") == 0
    log = (out / "train.log").read_text()
    assert "bf16, channels_last, 2 steps/epoch" in log
    assert _train("test_resnet_ML", small, out, "Train.num_workers=2", "Train.batch_size=16", "Train.epochs_iters=2",
                  "Train.precision=fp16", "Train.resume_path=latest") == 0
    log = (out / "train.log").read_text()
    assert "fp16, 1 steps/epoch, epochs 2-2, resumed from" in log and "at step 1" in log
    state = _state(out)
    assert state["scaler"]["scale"] > 0 and state["step"] == 2
    assert np.isfinite(state["history"][-1]["map_raw"])


def test_resuming_another_model_stops_at_once_with_one_line(small, whole, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(whole, out)  # a finished run of test_resnet_ML in this output
    capsys.readouterr()
    assert _train("test_vit_ML", small, out, "Train.epochs_iters=5", "Train.resume_path=latest") == 1
    err = capsys.readouterr().err
    assert "is a checkpoint of test_resnet_ML and does not fit test_vit_ML" in err
    assert "backbone 'test_resnet' vs 'test_vit'" in err and "Traceback" not in err
