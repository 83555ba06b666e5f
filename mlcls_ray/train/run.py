"""``Global.mode=train``: reads the dataset, builds the TorchTrainer (scaling, storage, failures, resume) and hands
it the streamed datasets; writes ``train_result.json`` when it ends.

Checkpoints live under ``<Global.output>/checkpoints/<run>/epoch_<N>/`` (local or ``s3://``), one run per
invocation, so a new run never resumes an old one by accident; ``Train.resume_path=latest`` asks for that.
"""

from __future__ import annotations

import os
import re
import sys
import time
import uuid

import numpy as np
import pyarrow.fs as pafs
import ray
import ray.train
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from mlcls_ray import results, storage
from mlcls_ray.config import Config, device_count
from mlcls_ray.data.manifest import Manifest
from mlcls_ray.data.manifest_rows import staging
from mlcls_ray.data.mlcls_format import LABEL_FILE, format_label_file, read_splits
from mlcls_ray.data.problems import ProblemLog
from mlcls_ray.devices import short_of
from mlcls_ray.models.zoo import ModelSpec, build_model
from mlcls_ray.train.data import train_dataset, val_dataset
from mlcls_ray.train.checkpoint import STATE_FILE, check_resumable, read_meta
from mlcls_ray.train.loop import train_fn

__all__ = ["CHECKPOINTS_DIR", "TrainSetupError", "latest_checkpoint", "model_spec", "run_train"]

CHECKPOINTS_DIR = "checkpoints"
_KEEP_CHECKPOINTS = 5  # PaddleX's last_1..last_5
_FORWARDED_ENV = ("HF_", "GLOO_", "NCCL_")  # settings the workers need as the driver has them (network, hub cache)
_SECRET = re.compile("TOKEN|SECRET|PASSWORD|KEY", re.IGNORECASE)


class TrainSetupError(ValueError):
    """The run cannot start as configured; the message says what to change."""


def model_spec(cfg: Config, num_classes: int) -> ModelSpec:
    """The network a config describes (the ``Arch.*`` keys and ``Train.image_size``)."""
    return ModelSpec.create(
        name=cfg["Global.model"], backbone=cfg["Arch.backbone"], tap=cfg["Arch.tap"], num_classes=num_classes,
        image_size=cfg["Train.image_size"], num_queries=cfg["Arch.num_queries"], embed_dim=cfg["Arch.embed_dim"],
        num_layers=cfg["Arch.num_layers"], num_heads=cfg["Arch.num_heads"], ffn_dim=cfg["Arch.ffn_dim"],
        dropout=cfg["Arch.dropout"])


def _scaling(cfg: Config) -> tuple[ScalingConfig, int]:
    """Workers and their resources; returns (config, torch threads per worker).

    On CPU, training workers must leave CPUs to the Ray Data tasks that decode their input, or the run waits
    forever for a CPU (ray-2.60.md trap 12); by default they share half of the cluster's CPUs.
    """
    device = cfg["Global.device"]
    use_gpu = device.startswith("gpu")
    workers = cfg["Train.num_workers"] or device_count(device)
    cpus, gpus = (float(ray.cluster_resources().get(k, 0)) for k in ("CPU", "GPU"))
    if use_gpu and gpus < workers:
        short_of(f"Global.device={device} asks for {workers} GPU worker(s), but the Ray cluster has {gpus:g} GPU(s)",
                  "use -o Global.device=cpu, or fewer workers", "GPU")
    per_worker = cfg["Train.cpus_per_worker"] or (1.0 if use_gpu else cpus / 2 / workers)
    if not use_gpu and workers * per_worker > cpus - 1 + 1e-9:
        short_of(f"Train.num_workers={workers} x Train.cpus_per_worker={per_worker:g} reserves "
                  f"{workers * per_worker:g} of the cluster's {cpus:g} CPUs and leaves less than 1 to decode images",
                  "lower one of them", "CPU")
    resources = {"CPU": per_worker, **({"GPU": 1} if use_gpu else {})}
    threads = max(1, round(per_worker))
    return ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources), threads


class _ValSplit(DataConfig):
    """Splits ``train`` evenly (every rank runs the same number of DDP steps) and ``val`` without dropping rows,
    so mAP is computed over the whole val set; Ray's default equal split drops up to world_size - 1 rows.

    Ray Train V2 calls this once per dataset; others pass them together: both work.
    """

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output: list[dict] = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            ds = ds.copy(ds)
            ds.context.execution_options = DataConfig.default_ingest_options()
            splits = ds.streaming_split(world_size, equal=name != "val", locality_hints=worker_node_ids)
            for shards, split in zip(output, splits):
                shards[name] = split
        return output


def _runs(output: str) -> list[str]:
    fs, path = storage.resolve(storage.join(output, CHECKPOINTS_DIR))
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("train-"))


def _epochs(output: str, run: str) -> list[int]:
    """The epochs of a run's checkpoint folders (``epoch_<N>``), newest first."""
    fs, path = storage.resolve(storage.join(output, CHECKPOINTS_DIR, run))
    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
             if i.type == pafs.FileType.Directory]
    return sorted((int(n[6:]) for n in names if n.startswith("epoch_") and n[6:].isdigit()), reverse=True)


def latest_checkpoint(output: str) -> str | None:
    """The newest complete checkpoint under ``<output>/checkpoints``: the highest epoch of the newest run."""
    for run in reversed(_runs(output)):
        for epoch in _epochs(output, run):
            uri = storage.join(output, CHECKPOINTS_DIR, run, f"epoch_{epoch}")
            if storage.exists(storage.join(uri, STATE_FILE)):
                return uri
    return None


def _resume_source(cfg: Config) -> str | None:
    path, output = cfg["Train.resume_path"], cfg["Global.output"]
    if path is None:
        return None
    if path in ("latest", "auto"):  # auto: a retried job resumes, its first attempt starts afresh
        found = latest_checkpoint(output)
        if found is None and path == "latest":
            raise TrainSetupError("Train.resume_path=latest: no checkpoint under "
                                  f"{storage.join(output, CHECKPOINTS_DIR)}; -o Train.resume_path=auto starts "
                                  "afresh when there is none")
        return found
    if not storage.exists(storage.join(path, STATE_FILE)):
        raise TrainSetupError(f"Train.resume_path: {path} is not a checkpoint folder (no {STATE_FILE}); "
                              "use an epoch_<N> folder under <Global.output>/checkpoints, latest, or auto")
    return path


def _read_splits(root: str, problems: ProblemLog) -> tuple[list[str], Manifest, Manifest]:
    names, train, val = read_splits(root, problems)
    if names is None:
        raise TrainSetupError(f"{storage.join(root, LABEL_FILE)} is missing or has problems; run check_dataset")
    if len(problems):
        print(f"mlcls: the dataset lists have problems; those lines are skipped:\n{problems.summary()}\n"
              "(run -o Global.mode=check_dataset for the full report)", file=sys.stderr)
    if len(train) == 0 or len(val) == 0:
        raise TrainSetupError(f"{root}: train.txt and val.txt must each list at least one image "
                              f"(found {len(train)} and {len(val)})")
    return names, train, val


def _worker_env() -> dict[str, str]:
    """The driver's non-secret settings for the workers' runtime_env (shown on the dashboard, frozen at submission):
    the S3 endpoint and region, and the network and hub settings; credentials come from each node's own chain."""
    forwarded = {k: v for k, v in os.environ.items() if k.startswith(_FORWARDED_ENV) and not _SECRET.search(k)}
    return {**storage.aws_settings(), **forwarded}


def run_train(cfg: Config, splits: tuple[list[str], Manifest, Manifest] | None = None) -> int:
    """Train; returns the exit code. Any failure also leaves PaddleX's ``done_flag: false`` record.

    ``splits`` (class names, train rows, val rows of ``Global.dataset_dir``) replaces reading its lists: the
    audit's folds.
    """
    output = storage.absolute(cfg["Global.output"])  # rank 0 writes here, from its own working folder
    with results.failure_recorded(output, results.TRAIN_RESULT), staging(output) as stage:
        return _train(cfg, output, stage, splits)


def _train(cfg: Config, output: str, stage: str, splits: tuple[list[str], Manifest, Manifest] | None) -> int:
    root = cfg["Global.dataset_dir"].rstrip("/")
    if splits is None:
        with ProblemLog() as problems:
            splits = _read_splits(root, problems)
    names, train, val = splits
    if cfg["Train.num_classes"] not in (None, len(names)):
        raise TrainSetupError(f"Train.num_classes={cfg['Train.num_classes']}, but label.txt names {len(names)} "
                              "classes; set it to null or fix label.txt")
    spec = model_spec(cfg, len(names))
    scaling, threads = _scaling(cfg)
    resume = _resume_source(cfg)
    if resume is not None:
        check_resumable(resume, spec)  # here, before any worker starts and retries
    meta = read_meta(resume) if resume is not None else None
    done = meta["epoch"] if meta is not None else 0  # epochs the checkpoint has trained, as it records them
    if done >= cfg["Train.epochs_iters"]:
        raise TrainSetupError(f"Train.resume_path: {resume} has trained {done} epochs and Train.epochs_iters is "
                              f"{cfg['Train.epochs_iters']}; raise Train.epochs_iters to train on")
    init_weights = None
    if resume is None and cfg["Train.pretrain_weight_path"] is not None:
        model, notes = build_model(spec, cfg["Train.pretrain_weight_path"])  # on the driver: one fetch, one error
        for note in notes:
            print(f"mlcls: {note}")
        init_weights = ray.put(model.state_dict())
        del model
    storage.write_text(storage.join(output, results.LABEL_DICT), format_label_file(names))

    workers, batch = scaling.num_workers, cfg["Train.batch_size"]
    steps = int(np.ceil((len(train) // workers) / batch))
    run_name = f"train-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    size, limits = spec.image_size, {"max_pixels": cfg["Global.max_image_pixels"],
                                     "max_file_bytes": cfg["Global.max_file_bytes"]}
    ray.data.DataContext.get_current().enable_progress_bars = False  # the per-epoch lines say more
    datasets = {"train": train_dataset(train, root, augment=cfg["Train.augment"] or "none", size=size,
                                       seed=cfg["Train.seed"], stage=storage.join(stage, "train"), **limits),
                "val": val_dataset(val, root, size=size, stage=storage.join(stage, "val"), **limits)}
    config = {
        "spec": spec.to_dict(), "label_names": names, "output": output, "run_name": run_name,
        "init_weights": init_weights, "resume_from": resume, "threads": threads, "seed": cfg["Train.seed"],
        "epochs": cfg["Train.epochs_iters"], "steps_per_epoch": steps, "batch_size": batch,
        "lr": cfg["Train.learning_rate"], "head_lr": cfg["Train.head_learning_rate"],
        "weight_decay": cfg["Train.weight_decay"], "warmup_epochs": cfg["Train.warmup_steps"],
        "lr_scheduler": cfg["Train.lr_scheduler"],
        "ema_decay": cfg["Train.ema_decay"], "loss": cfg["Train.loss"], "precision": cfg["Train.precision"],
        "channels_last": cfg["Train.channels_last"],
        "log_interval": cfg["Train.log_interval"], "eval_interval": cfg["Train.eval_interval"],
        "save_interval": cfg["Train.save_interval"],
    }
    fs, storage_path = storage.resolve(storage.join(output, CHECKPOINTS_DIR))
    print(f"training {spec.name} on {len(train):,} images ({len(val):,} val, {len(names)} classes) with {workers} "
          f"worker(s), batch {batch} per worker; checkpoints: {storage.join(output, CHECKPOINTS_DIR, run_name)}")
    trainer = TorchTrainer(
        train_fn, train_loop_config=config, scaling_config=scaling, datasets=datasets, dataset_config=_ValSplit(),
        run_config=RunConfig(
            name=run_name, storage_path=storage_path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg["Train.max_failures"]),
            checkpoint_config=CheckpointConfig(num_to_keep=_KEEP_CHECKPOINTS),
            worker_runtime_env={"env_vars": _worker_env()}))
    result = trainer.fit()
    return _finish(cfg, output, run_name, result)


def _finish(cfg: Config, output: str, run_name: str, result: ray.train.Result) -> int:
    kept = sorted(((m["epoch"], m.get("score")) for _, m in result.best_checkpoints), reverse=True)
    checkpoints = [{"score": score, "epoch": epoch, "path": f"{CHECKPOINTS_DIR}/{run_name}/epoch_{epoch}"}
                   for epoch, score in kept]
    best = (result.metrics or {}).get("best")
    uri = results.write_result(output, results.TRAIN_RESULT,
                               results.train_result(cfg["Global.model"], best, checkpoints, done=True))
    if best is None:
        print(f"Training finished, but no epoch produced a val mAP. Result: {uri}", file=sys.stderr)
        return 1
    print(f"Training finished: best val mAP {best['score']:.4f} (epoch {best['epoch']}, {best['weights']} weights); "
          f"model: {storage.join(output, 'best_model')}; result: {uri}")
    return 0

