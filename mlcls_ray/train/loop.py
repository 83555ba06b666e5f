"""The per-worker training function: epochs, AMP, EMA, checkpoints; scoring and selection are in their modules.

Ray Train runs :func:`train_fn` once per worker. The Ray calls are marked ``# [ray]``; the rest is a plain
PyTorch loop. Rank 0 alone writes files (checkpoints, ``best_model/``, logs); every rank reports each epoch, since
``ray.train.report`` is a barrier.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import CheckpointUploadMode
from timm.utils import ModelEmaV3

from mlcls_ray.data.transforms import ModelInput
from mlcls_ray.models.loss import build_loss
from mlcls_ray.models.zoo import ModelSpec, build_model
from mlcls_ray.precision import autocast_dtype, precision_name
from mlcls_ray.train import checkpoint
from mlcls_ray.train.data import TorchBatches
from mlcls_ray.train.optim import build_optimizer, build_schedule
from mlcls_ray.train.progress import RunLog, hms
from mlcls_ray.train.scoring import score_shard
from mlcls_ray.train.selection import best_on_disk, select_best

__all__ = ["RAY_REPORT_LOGGER", "make_ema", "train_fn"]

# Ray 2.60 logs every report with all its metrics, per rank, under a logger named by the path of this file of its
# own; our per-epoch lines say the same once. tests/train/test_loop_parts.py fails when an upgrade moves it.
RAY_REPORT_LOGGER = "ray/train/v2/_internal/execution/context.py"


def make_ema(model: torch.nn.Module, decay: float) -> ModelEmaV3:
    """An EMA of ``model`` whose every update is ``ema = decay * ema + (1 - decay) * model``, from the first step,
    as PaddleX's: timm's warm-up (power 2/3) would hold the decay near 0.998 for the first 10k steps whatever
    ``Train.ema_decay`` says. Call ``update(model)`` without a step."""
    return ModelEmaV3(model, decay=decay, use_warmup=False)


def _silence_ray_report_log() -> None:
    for name in logging.root.manager.loggerDict:
        if name.endswith(RAY_REPORT_LOGGER):
            logging.getLogger(name).setLevel(logging.WARNING)


def train_fn(config: dict) -> None:
    """One Train worker. ``config`` is built by :func:`mlcls_ray.train.run.run_train`."""
    ctx = ray.train.get_context()  # [ray]
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    _silence_ray_report_log()
    spec = ModelSpec.from_dict(config["spec"])
    device = ray.train.torch.get_device()  # [ray]
    torch.set_num_threads(config["threads"])
    torch.manual_seed(config["seed"])  # the same initial weights on every rank
    channels_last = device.type == "cuda" if config["channels_last"] is None else config["channels_last"]
    amp = autocast_dtype(device, config["precision"])
    to_input = ModelInput(spec.mean, spec.std, device, channels_last)

    model, _ = build_model(spec)
    if config["init_weights"] is not None:
        model.load_state_dict(ray.get(config["init_weights"]))  # [ray] pretrained, fetched once by the driver
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    optimizer = build_optimizer(model, config["lr"], config["head_lr"], config["weight_decay"])
    epochs, steps = config["epochs"], config["steps_per_epoch"]
    scheduler = build_schedule(optimizer, config["lr_scheduler"], epochs, steps, config["warmup_epochs"])
    ema = make_ema(model, config["ema_decay"]) if config["ema_decay"] > 0 else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    criterion = build_loss(config["loss"])

    start_epoch, step, best, history = 0, 0, None, []
    restored = ray.train.get_checkpoint()  # [ray] set after a worker failure restarted the group
    resume_from = None
    if restored is not None:
        with restored.as_directory() as d:
            state = checkpoint.load_state(d)
        resume_from = "its latest checkpoint"
    elif config["resume_from"] is not None:
        state, resume_from = checkpoint.load_state(config["resume_from"]), config["resume_from"]
    if resume_from is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        if scaler.is_enabled() and state["scaler"]:  # a scaler saved disabled (bf16, fp32) has an empty state
            scaler.load_state_dict(state["scaler"])
        start_epoch, best, history = state["epoch"], state["best"], state["history"]
        step = checkpoint.resume_step(state, steps)  # another worker count: the schedule continues by epochs
        scheduler.step_update(step)
    if rank == 0:  # the one rank that writes best_model/ reads it back
        best = best_on_disk(config["output"], best, config["run_name"], resumed=resume_from is not None)
    ddp_model = ray.train.torch.prepare_model(  # [ray] DDP when there is more than one worker
        model, parallel_strategy_kwargs={"gradient_as_bucket_view": True, "static_graph": True})
    cpu_group = dist.new_group(backend="gloo") if dist.get_backend() == "nccl" else None  # val exchanges on CPU

    log = RunLog(config["output"], config["run_name"]) if rank == 0 else None
    if log is not None:
        log(f"[Train] {spec.name}: {world_size} worker(s) on {device.type}, {precision_name(amp)}"
            f"{', channels_last' if channels_last else ''}, {steps} steps/epoch, epochs {start_epoch + 1}-{epochs}"
            + (f", resumed from {resume_from} at step {step}" if resume_from else ""))
    train_shard = ray.train.get_dataset_shard("train")  # [ray] this worker's share of the stream
    val_shard = ray.train.get_dataset_shard("val")  # [ray]
    for epoch in range(start_epoch, epochs):
        torch.manual_seed(config["seed"] + 1000 * epoch + rank)  # dropout masks differ by rank; a resume replays
        ddp_model.train()
        started, seen, loss_sum, i = time.monotonic(), 0, torch.zeros((), device=device), -1
        batches = train_shard.iter_torch_batches(  # [ray] the dense target is built per batch, on this worker
            batch_size=config["batch_size"], collate_fn=TorchBatches(spec.num_classes, np.float32), device=device,
            prefetch_batches=4, pin_memory=device.type == "cuda")
        for i, batch in enumerate(batches):
            x = to_input(batch["image"])  # [B, 3, S, S]
            y = batch["labels"]  # [B, C]
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = ddp_model(x)
            loss = criterion(logits.float(), y)  # summed over the batch and classes, as the recipe
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            scheduler.step_update(step)
            if ema is not None:
                ema.update(model)
            seen += len(y)
            loss_sum += loss.detach()
            if log is not None and (i + 1) % config["log_interval"] == 0:
                log(f"[Train][Epoch {epoch + 1}/{epochs}][Iter: {i + 1}/{steps}] loss: {loss.item():.5f}, "
                    f"lr: {optimizer.param_groups[0]['lr']:.3g}, ips: {seen / (time.monotonic() - started):.1f} "
                    "images/s (this worker)")
        total_loss, total_seen, total_batches = _all_sum([float(loss_sum), seen, i + 1], device)
        seconds = time.monotonic() - started
        record = {"epoch": epoch + 1, "step": step, "loss": total_loss / max(total_batches, 1),
                  "lr": optimizer.param_groups[0]["lr"], "images": int(total_seen),
                  "images_per_s": total_seen / seconds, "seconds": seconds}

        last = epoch + 1 == epochs
        if (epoch + 1) % config["eval_interval"] == 0 or last:
            models = [model] + ([ema.module] if ema is not None else [])
            val_logits, val_labels = score_shard(models, val_shard, to_input, device, config["batch_size"], amp,
                                                 spec.num_classes)
            best = select_best(config, spec, record, val_logits, val_labels, models, best, log, cpu_group)
            del val_logits, val_labels  # this rank's val rows: freed before the next epoch's training
        history.append(record)
        if log is not None:
            _log_epoch(log, record, epochs, history, remaining=(epochs - epoch - 1) * (time.monotonic() - started))

        saved = None
        if rank == 0 and ((epoch + 1) % config["save_interval"] == 0 or last):
            saved = Path(tempfile.mkdtemp(prefix="mlcls-ckpt-"))
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "ema": ema.state_dict() if ema is not None else None, "scaler": scaler.state_dict(),
                     "epoch": epoch + 1, "step": step, "best": best, "history": history}
            checkpoint.save(saved, state, spec, world_size, steps)
        metrics = dict(record)  # small: Ray logs every report
        metrics.update({"score": record.get("score"), "best": best})
        ray.train.report(  # [ray] a barrier: every rank, every epoch; rank 0 attaches the checkpoint
            metrics, checkpoint=ray.train.Checkpoint.from_directory(saved) if saved else None,
            checkpoint_dir_name=f"epoch_{epoch + 1}" if saved else None,
            # uploaded in the background, and the local copy deleted after: the GPUs go on training meanwhile
            checkpoint_upload_mode=CheckpointUploadMode.ASYNC)
    if log is not None:
        log.close()


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device if dist.get_backend() == "nccl" else None)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _log_epoch(log: RunLog, record: dict, epochs: int, history: list[dict], remaining: float) -> None:
    epoch = record["epoch"]
    if not torch.isfinite(torch.tensor(record["loss"])):
        log(f"[Train][Epoch {epoch}/{epochs}] DIVERGED: the training loss is {record['loss']}; lower "
            "Train.learning_rate or Train.head_learning_rate")
    log(f"[Train][Epoch {epoch}/{epochs}][Avg] loss: {record['loss']:.5f}, lr: {record['lr']:.3g}, "
        f"ips: {record['images_per_s']:.1f} images/s, elapsed: {hms(log.elapsed())}, ETA: {hms(remaining)}")
    log.tb.add_scalar("train/loss", record["loss"], epoch)
    log.tb.add_scalar("train/lr", record["lr"], epoch)
    log.tb.add_scalar("train/images_per_s", record["images_per_s"], epoch)
    for key in ("map_raw", "map_ema"):
        if key in record:
            log.tb.add_scalar(f"val/{key}", record[key], epoch)
    log.flush(history)
