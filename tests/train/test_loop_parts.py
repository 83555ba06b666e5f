"""The training loop's parts without a training run: precision choice, EMA decay, weight-decay exemptions,
divergence, class-sharded model selection on 2 gloo ranks, checkpoint compatibility, the val split and the Ray logger
it silences."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mlcls_ray import model_dir
from mlcls_ray.metrics import calibrate_thresholds, mean_average_precision
from mlcls_ray.models.zoo import ModelSpec, build_model
from mlcls_ray.precision import autocast_dtype
from mlcls_ray.train import checkpoint, scoring
from mlcls_ray.train.loop import RAY_REPORT_LOGGER, make_ema
from mlcls_ray.train.optim import build_optimizer
from mlcls_ray.train.progress import RunLog
from mlcls_ray.train.selection import select_best
from tests.helpers import free_port


def _spec(backbone: str = "test_resnet", **fields) -> ModelSpec:
    return ModelSpec.create(name=f"{backbone}_ML", backbone=backbone, tap="features", image_size=32,
                            **{"num_classes": 3, "embed_dim": 32, "num_heads": 2, "ffn_dim": 64, **fields})


def test_auto_precision_is_fp16_with_a_scaler_where_bf16_is_only_emulated(monkeypatch):
    """A V100 or T4 reports bf16 through emulation; auto must not train there in slow emulated bf16."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert autocast_dtype(torch.device("cuda"), "auto") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere and later
    assert autocast_dtype(torch.device("cuda"), "auto") == torch.bfloat16
    assert autocast_dtype(torch.device("cpu"), "auto") is None
    assert autocast_dtype(torch.device("cpu"), "bf16") == torch.bfloat16


def test_ema_decay_means_what_it_says_from_the_first_step():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    ema = make_ema(model, 0.9)
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, 0.9 * before + 0.1 * model.weight.detach())


def test_vit_position_embedding_and_cls_token_are_not_decayed():
    model, _ = build_model(_spec("test_vit"))
    optimizer = build_optimizer(model, lr=1e-3, head_lr_cap=2e-4, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    undecayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"backbone.pos_embed", "backbone.cls_token"} <= undecayed
    assert "head.proj.weight" not in undecayed
    def head_rates(optimizer) -> set[float]:
        return {g["lr"] for g in optimizer.param_groups if any(names[id(p)].startswith("head.") for p in g["params"])}

    assert head_rates(optimizer) == {2e-4}  # the head at its cap, the backbone at 1e-3
    assert head_rates(build_optimizer(model, lr=1e-4, head_lr_cap=2e-4, weight_decay=0.05)) == {1e-4}  # below it


def test_a_diverged_epoch_says_so_and_is_never_the_best(tmp_path):
    spec = _spec()
    model, _ = build_model(spec)
    labels = np.eye(3, dtype=np.uint8)[np.arange(12) % 3]
    good = labels * 5.0 - 2.5  # perfect scores
    nan = good.copy()
    nan[0, 0] = np.nan  # NaN ranks first in AP and would give a finite mAP
    config = {"run_name": "r", "output": str(tmp_path), "label_names": ["a", "b", "c"]}
    log = RunLog(str(tmp_path), "r")
    record = {"epoch": 1}
    assert select_best(config, spec, record, [nan.astype(np.float32)], labels, [model], None, log) is None
    assert np.isnan(record["score"]) and np.isnan(record["map_raw"])
    assert any("DIVERGED" in line and "raw weights" in line for line in log.lines)
    assert not (tmp_path / "best_model").exists()
    record = {"epoch": 2}
    best = select_best(config, spec, record, [good.astype(np.float32)], labels, [model], None, log)
    assert best["score"] == pytest.approx(1.0) and model_dir.read_info(str(tmp_path / "best_model")).extra["epoch"] == 2
    log.close()


def _val_epochs() -> tuple[list[list[np.ndarray]], np.ndarray]:
    """Two epochs of raw and EMA val logits over 103 images and 7 classes: integer scores (ties), a class without
    positives; in epoch 2 the raw weights diverge on one image and the EMA gets better."""
    rng = np.random.default_rng(7)
    labels = (rng.random((103, 7)) < 0.3).astype(np.uint8)
    labels[:, 3] = 0
    raw = np.round(labels + 1.2 * rng.standard_normal(labels.shape)).astype(np.float32)
    ema = np.round(2 * labels + rng.standard_normal(labels.shape)).astype(np.float32)
    diverged = raw.copy()
    diverged[90, 5] = np.inf
    return [[raw, ema], [diverged, 2 * ema + labels]], labels


def _select_epochs(rank: int, world: int, port: int, output: str) -> None:
    """Rank ``rank`` of ``world`` gloo processes (one process without a group) runs select_best on its share of the
    val rows (60 and 43: uneven, as Ray's split may leave them), as the training loop does each epoch. The exchange
    moves the scores in 3 rounds of classes (a 512-byte buffer), the labels in one."""
    scoring._EXCHANGE_BYTES = 512  # a spawned rank's own module; the test's process restores its own
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=120))  # a failed rank stops the other within the test
    epochs, labels = _val_epochs()
    rows = np.arange(len(labels)) if world == 1 else np.split(np.arange(len(labels)), [60])[rank]
    spec = _spec(num_classes=labels.shape[1])
    models = [build_model(spec)[0]] * 2
    config = {"run_name": "r", "output": output, "label_names": list("abcdefg")}
    log = RunLog(output, "r") if rank == 0 else None
    best, records = None, []
    for epoch, logits in enumerate(epochs, 1):
        record = {"epoch": epoch}
        best = select_best(config, spec, record, [lg[rows] for lg in logits], labels[rows], models, best, log)
        records.append(record)
    if log is not None:
        log.close()
        Path(output, "selected.json").write_text(json.dumps({"records": records, "best": best, "log": log.lines}))
    if world > 1:
        dist.destroy_process_group()


def test_class_sharded_selection_on_two_gloo_ranks_equals_one_process(tmp_path, monkeypatch):
    """Each rank computes the AP and thresholds of its block of classes over every rank's rows: the mAPs, the
    divergence count, the choice and the saved thresholds are those of one process holding every row, and equal
    to the metrics of the whole matrix."""
    monkeypatch.setattr(scoring, "_EXCHANGE_BYTES", scoring._EXCHANGE_BYTES)
    _select_epochs(0, 1, 0, str(tmp_path / "one"))
    port = free_port()
    other = mp.get_context("spawn").Process(target=_select_epochs, args=(1, 2, port, str(tmp_path / "two")))
    other.start()  # rank 1 in a fresh process; rank 0 here, where torch is already imported
    _select_epochs(0, 2, port, str(tmp_path / "two"))
    other.join()
    assert other.exitcode == 0
    one, two = (json.loads((tmp_path / d / "selected.json").read_text()) for d in ("one", "two"))
    assert two["records"] == one["records"] and two["best"] == one["best"]  # json parses NaN to one object: equal
    (raw, ema), labels = _val_epochs()[0][0], _val_epochs()[1]
    assert one["records"][0]["map_raw"] == mean_average_precision(raw, labels)
    assert one["records"][0]["map_ema"] == mean_average_precision(ema, labels)
    assert np.isnan(one["records"][1]["map_raw"]) and one["best"] == {
        "score": one["records"][1]["map_ema"], "epoch": 2, "weights": "ema", "run": "r"}
    assert any("DIVERGED: the raw weights give NaN or inf scores for 1 of 103 val images" in line
               for line in two["log"])
    saved = [model_dir.read_info(str(tmp_path / d / "best_model")).thresholds for d in ("one", "two")]
    probs = torch.from_numpy(_val_epochs()[0][1][1]).sigmoid().numpy()
    assert saved[1] == saved[0] == [round(float(t), 6) for t in calibrate_thresholds(probs, labels)]


def test_a_checkpoint_of_another_model_is_refused_before_training(tmp_path):
    checkpoint.save(tmp_path, {"epoch": 1, "step": 8}, _spec(), world_size=1, steps_per_epoch=8)
    checkpoint.check_resumable(str(tmp_path), _spec())  # the same network: fine
    with pytest.raises(checkpoint.ResumeError, match=r"does not fit .*backbone 'test_resnet' vs 'test_vit'"):
        checkpoint.check_resumable(str(tmp_path), _spec("test_vit"))
    with pytest.raises(checkpoint.ResumeError, match="num_classes 3 vs 5"):
        checkpoint.check_resumable(str(tmp_path), _spec(num_classes=5))


def test_resuming_on_another_worker_count_continues_the_schedule_by_epochs():
    state = {"epoch": 3, "step": 3 * 10}  # saved by 2 workers at 10 steps an epoch
    assert checkpoint.resume_step(state, 20) == 60  # 1 worker runs 20 steps an epoch: epoch 3 ends at step 60
    assert checkpoint.resume_step(state, 10) == 30


def test_the_ray_report_logger_we_silence_exists():
    """Ray 2.60 logs each report under a logger named by a file path; an upgrade that moves it fails here."""
    import ray.train.v2._internal.execution.context  # noqa: F401

    assert any(name.endswith(RAY_REPORT_LOGGER) for name in logging.root.manager.loggerDict)


@pytest.mark.usefixtures("ray_start_2_cpus")
def test_the_val_split_keeps_every_row_whether_datasets_come_one_by_one_or_together():
    """Ray Train 2.60 configures one dataset a call; other versions pass them together. Both get both splits:
    train cut even (the same DDP steps on every rank), val whole (mAP over every image)."""
    import ray.data

    from mlcls_ray.train.run import _ValSplit

    def rows(splits) -> list[int]:  # streaming splits are read at the same time, as the workers do
        with ThreadPoolExecutor(len(splits)) as pool:
            return list(pool.map(lambda s: sum(len(b["id"]) for b in s.iter_batches(batch_size=None)), splits))

    together = _ValSplit().configure({"train": ray.data.range(11), "val": ray.data.range(11)}, 2, None, None)
    assert [set(shards) for shards in together] == [{"train", "val"}] * 2
    assert rows([s["train"] for s in together]) == [5, 5]
    assert sum(rows([s["val"] for s in together])) == 11
    one = _ValSplit().configure({"val": ray.data.range(11)}, 2, None, None)
    assert sum(rows([s["val"] for s in one])) == 11


def test_training_workers_get_settings_but_never_credentials(monkeypatch):
    """The workers' runtime_env is shown on the dashboard and frozen at submission: endpoint, region and network
    settings go there; keys and tokens never do (each node's own credential chain supplies them)."""
    from mlcls_ray.train.run import _worker_env

    for name, value in {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_REGION": "eu-west-1",
                        "AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "s3cret", "AWS_SESSION_TOKEN": "tok",
                        "HF_TOKEN": "hf_secret", "HF_HUB_OFFLINE": "1", "NCCL_SOCKET_IFNAME": "eth0"}.items():
        monkeypatch.setenv(name, value)
    env = _worker_env()
    assert {"AWS_ENDPOINT_URL", "AWS_REGION", "HF_HUB_OFFLINE", "NCCL_SOCKET_IFNAME"} <= env.keys()
    assert not {"s3cret", "tok", "hf_secret", "AKIA"} & set(env.values()), env
