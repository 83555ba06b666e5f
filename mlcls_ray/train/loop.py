"""The per-worker training function: epochs, AMP, EMA, whole-val-set mAP, checkpoints and the best model.

Ray Train runs :func:`train_fn` once per worker. The Ray calls are marked ``# [ray]``; the rest is a plain
PyTorch loop. Rank 0 alone writes files (checkpoints, ``best_model/``, logs); every rank reports each epoch, since
``ray.train.report`` is a barrier.
"""

from __future__ import annotations

import io
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train.v2._internal.execution import context as train_context
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3

from mlcls_ray import model_dir, results, storage
from mlcls_ray.data.transforms import to_model_input
from mlcls_ray.metrics import calibrate_thresholds, mean_average_precision
from mlcls_ray.models.loss import build_loss
from mlcls_ray.models.zoo import ModelSpec, build_model
from mlcls_ray.train.progress import RunLog, hms

__all__ = ["STATE_FILE", "cosine_schedule", "load_state", "train_fn"]

STATE_FILE = "state.pt"
_WARMUP_LR = 1e-6  # PaddleX: linear warm-up from 1e-6
_MIN_LR = 1e-10  # PaddleX's cosine eta_min


def cosine_schedule(optimizer: torch.optim.Optimizer, epochs: int, steps: int, warmup_epochs: int
                    ) -> CosineLRScheduler:
    """PaddleX's schedule, stepped per iteration: linear warm-up from 1e-6 over ``warmup_epochs``, then a cosine
    from the base rate to 1e-10 over the remaining epochs (the cosine starts after the warm-up, not under it)."""
    warmup = min(warmup_epochs, epochs - 1) * steps
    return CosineLRScheduler(optimizer, t_initial=max(1, epochs * steps - warmup), lr_min=_MIN_LR, warmup_t=warmup,
                             warmup_lr_init=_WARMUP_LR, warmup_prefix=True, t_in_epochs=False)


def _amp_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU has it, else fp16 (with a scaler); fp32 on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_state(uri: str) -> dict:
    """A checkpoint's training state; ``uri`` is the checkpoint folder (local or ``s3://``)."""
    return torch.load(io.BytesIO(storage.read_bytes(storage.join(uri, STATE_FILE))), map_location="cpu",
                      weights_only=True)


def _gather_rows(local: np.ndarray, group: dist.ProcessGroup | None) -> np.ndarray | None:
    """Concatenate every rank's rows on rank 0 (None elsewhere); shards may differ in length, padding is trimmed.

    It runs on CPU tensors over a gloo ``group``, so val scores never take GPU memory from the model."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    n = torch.tensor([local.shape[0]])
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n, group=group)
    padded = torch.zeros((int(max(sizes)), *local.shape[1:]), dtype=torch.from_numpy(local[:0]).dtype)
    padded[:len(local)] = torch.from_numpy(local)
    rank0 = dist.get_rank() == 0
    out = [torch.empty_like(padded) for _ in sizes] if rank0 else None
    dist.gather(padded, out, dst=0, group=group)
    if not rank0:
        return None
    return np.concatenate([o[:int(s)].numpy() for o, s in zip(out, sizes)])


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device if dist.get_backend() == "nccl" else None)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _sync_from_rank0(module: torch.nn.Module) -> None:
    """Give every rank rank 0's weights and buffers. DDP keeps parameters equal, but each rank's BatchNorm
    statistics (and so its EMA copy) move with its own last batch; scoring must use the model that is saved."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


@torch.no_grad()
def _score(models: list[torch.nn.Module], shard, spec: ModelSpec, device: torch.device, batch_size: int,
           amp: torch.dtype | None) -> tuple[list[np.ndarray], np.ndarray]:
    """fp32 logits of each model over this worker's val rows, and their labels; one decode feeds every model."""
    for m in models:
        _sync_from_rank0(m)
        m.eval()
    logits: list[list[np.ndarray]] = [[] for _ in models]
    labels = []
    dtypes = {"index": torch.int64, "image": torch.uint8, "labels": torch.uint8}
    for batch in shard.iter_torch_batches(batch_size=batch_size, dtypes=dtypes, device=device):
        x = to_model_input(batch["image"], spec.mean, spec.std, channels_last=device.type == "cuda")
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            for out, m in zip(logits, models):
                out.append(m(x).float().cpu().numpy())  # [B, C] fp32: mAP on fp32 logits, never fp16 ties
        labels.append(batch["labels"].cpu().numpy())
    c = spec.num_classes
    return ([np.concatenate(o) if o else np.zeros((0, c), np.float32) for o in logits],
            np.concatenate(labels) if labels else np.zeros((0, c), np.uint8))


def train_fn(config: dict) -> None:
    """One Train worker. ``config`` is built by :func:`mlcls_ray.train.run.run_train`."""
    ctx = ray.train.get_context()  # [ray]
    rank = ctx.get_world_rank()
    # Ray 2.60 logs every report with all its metrics, per rank, under a logger named by its file path; our
    # per-epoch lines say the same once
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    spec = ModelSpec.from_dict(config["spec"])
    device = ray.train.torch.get_device()  # [ray]
    torch.set_num_threads(config["threads"])
    torch.manual_seed(config["seed"])  # the same initial weights on every rank
    channels_last = device.type == "cuda"
    amp = _amp_dtype(device)

    model, _ = build_model(spec)
    if config["init_weights"] is not None:
        model.load_state_dict(ray.get(config["init_weights"]))  # [ray] pretrained, fetched once by the driver
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    optimizer = create_optimizer_v2(model, "adamw", lr=config["lr"], weight_decay=config["weight_decay"])
    epochs, steps = config["epochs"], config["steps_per_epoch"]
    scheduler = cosine_schedule(optimizer, epochs, steps, config["warmup_epochs"])
    ema = ModelEmaV3(model, decay=config["ema_decay"], use_warmup=True) if config["ema_decay"] > 0 else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    criterion = build_loss(config["loss"])

    start_epoch, step, best, history = 0, 0, None, []
    checkpoint = ray.train.get_checkpoint()  # [ray] set after a worker failure restarted the group
    resume_from = None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_state(d)
        resume_from = "its latest checkpoint"
    elif config["resume_from"] is not None:
        state, resume_from = load_state(config["resume_from"]), config["resume_from"]
    if resume_from is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, step, best, history = state["epoch"], state["step"], state["best"], state["history"]
        scheduler.step_update(step)
    if rank == 0:  # the one rank that writes best_model/ reads it back
        best = _best_on_disk(config["output"], best, config["run_name"], resumed=resume_from is not None)
    ddp_model = ray.train.torch.prepare_model(  # [ray] DDP when there is more than one worker
        model, parallel_strategy_kwargs={"gradient_as_bucket_view": True, "static_graph": True})
    cpu_group = dist.new_group(backend="gloo") if dist.get_backend() == "nccl" else None  # val gathers on CPU

    log = RunLog(config["output"], config["run_name"]) if rank == 0 else None
    if log is not None:
        log(f"[Train] {spec.name}: {ctx.get_world_size()} worker(s) on {device.type}, "
            f"{'bf16' if amp == torch.bfloat16 else 'fp16' if amp else 'fp32'}, {steps} steps/epoch, "
            f"epochs {start_epoch + 1}-{epochs}" + (f", resumed from {resume_from}" if resume_from else ""))
    train_shard = ray.train.get_dataset_shard("train")  # [ray] this worker's share of the stream
    val_shard = ray.train.get_dataset_shard("val")  # [ray]
    for epoch in range(start_epoch, epochs):
        torch.manual_seed(config["seed"] + 1000 * epoch + rank)  # dropout masks differ by rank; a resume replays
        ddp_model.train()
        started, seen, loss_sum = time.monotonic(), 0, torch.zeros((), device=device)
        batches = train_shard.iter_torch_batches(  # [ray]
            batch_size=config["batch_size"], dtypes={"image": torch.uint8, "labels": torch.float32}, device=device,
            prefetch_batches=4, pin_memory=device.type == "cuda", local_shuffle_buffer_size=4 * config["batch_size"])
        for i, batch in enumerate(batches):
            x = to_model_input(batch["image"], spec.mean, spec.std, channels_last)  # [B, 3, S, S]
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
                ema.update(model, step=step)
            seen += len(y)
            loss_sum += loss.detach()
            if log is not None and (i + 1) % config["log_interval"] == 0:
                log(f"[Train][Epoch {epoch + 1}/{epochs}][Iter: {i + 1}/{steps}] loss: {loss.item():.5f}, "
                    f"lr: {optimizer.param_groups[0]['lr']:.3g}, ips: {seen / (time.monotonic() - started):.1f} "
                    "images/s (this worker)")
        total_loss, total_seen, total_batches = _all_sum([float(loss_sum), seen, i + 1 if seen else 0], device)
        seconds = time.monotonic() - started
        record = {"epoch": epoch + 1, "loss": total_loss / max(total_batches, 1),
                  "lr": optimizer.param_groups[0]["lr"], "images": int(total_seen),
                  "images_per_s": total_seen / seconds, "seconds": seconds}

        last = epoch + 1 == epochs
        if (epoch + 1) % config["eval_interval"] == 0 or last:
            models = [model] + ([ema.module] if ema is not None else [])
            local_logits, local_labels = _score(models, val_shard, spec, device, config["batch_size"], amp)
            gathered = [_gather_rows(lg, cpu_group) for lg in local_logits]
            labels = _gather_rows(local_labels, cpu_group)
            if rank == 0:
                best = _evaluate(config, spec, record, gathered, labels, models, best, log)
        history.append(record)
        if log is not None:
            remaining = (epochs - epoch - 1) * (time.monotonic() - started)  # evaluation included
            log(f"[Train][Epoch {epoch + 1}/{epochs}][Avg] loss: {record['loss']:.5f}, lr: {record['lr']:.3g}, "
                f"ips: {record['images_per_s']:.1f} images/s, elapsed: {hms(log.elapsed())}, ETA: {hms(remaining)}")
            log.tb.add_scalar("train/loss", record["loss"], epoch + 1)
            log.tb.add_scalar("train/lr", record["lr"], epoch + 1)
            log.tb.add_scalar("train/images_per_s", record["images_per_s"], epoch + 1)
            for key in ("map_raw", "map_ema"):
                if key in record:
                    log.tb.add_scalar(f"val/{key}", record[key], epoch + 1)
            log.flush(history)

        saved = None
        if rank == 0 and ((epoch + 1) % config["save_interval"] == 0 or last):
            saved = Path(tempfile.mkdtemp(prefix="mlcls-ckpt-"))
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "ema": ema.state_dict() if ema is not None else None, "scaler": scaler.state_dict(),
                        "epoch": epoch + 1, "step": step, "best": best, "history": history}, saved / STATE_FILE)
        metrics = dict(record)  # small: Ray logs every report
        metrics.update({"score": record.get("score"), "best": best})
        ray.train.report(  # [ray] a barrier: every rank, every epoch; rank 0 attaches the checkpoint
            metrics, checkpoint=ray.train.Checkpoint.from_directory(saved) if saved else None,
            checkpoint_dir_name=f"epoch_{epoch + 1}" if saved else None)
        if saved is not None:
            shutil.rmtree(saved, ignore_errors=True)
    if log is not None:
        log.close()


def _best_on_disk(output: str, best: dict | None, run_name: str, resumed: bool) -> dict | None:
    """The better of the checkpoint's best and the best_model/ on disk, when that model belongs to this run or the
    one resumed: a group restarted after writing a new best but before its checkpoint was registered starts from an
    older best (or none), and must not replace the newer model with a worse one. A new run starts afresh."""
    try:
        on_disk = model_dir.read_info(storage.join(output, "best_model")).extra
    except ValueError:
        return best
    ours = on_disk.get("run") == run_name or resumed
    if ours and "score" in on_disk and (best is None or on_disk["score"] > best["score"]):
        return {k: on_disk[k] for k in ("score", "epoch", "weights", "run") if k in on_disk}
    return best


def _evaluate(config: dict, spec: ModelSpec, record: dict, logits: list[np.ndarray], labels: np.ndarray,
              models: list[torch.nn.Module], best: dict | None, log: RunLog) -> dict | None:
    """Score raw and EMA weights on the whole val set; write best_model/ when the better one beats the best."""
    maps = [mean_average_precision(lg, labels) for lg in logits]
    record["map_raw"] = maps[0]
    if len(maps) > 1:
        record["map_ema"] = maps[1]
    pick = int(np.nanargmax(maps)) if not np.all(np.isnan(maps)) else 0
    record["score"] = float(maps[pick])
    which = "raw" if pick == 0 else "ema"
    line = f"[Eval][Epoch {record['epoch']}][Avg] MultiLabelMAP(integral): {maps[pick]:.5f}, raw {maps[0]:.5f}"
    line += f", EMA {maps[1]:.5f}" if len(maps) > 1 else ""
    log(line + f" over {len(labels):,} val images")
    if np.isnan(maps[pick]) or (best is not None and maps[pick] <= best["score"]):
        return best
    probs = torch.from_numpy(logits[pick]).sigmoid_().numpy()  # in place, float32
    thresholds = calibrate_thresholds(probs, labels)
    best = {"score": float(maps[pick]), "epoch": record["epoch"], "weights": which, "run": config["run_name"]}
    model_dir.save(storage.join(config["output"], "best_model"), spec, models[pick].state_dict(),
                   config["label_names"], thresholds, extra=best)
    log(f"[Eval][Epoch {record['epoch']}] new best model ({which} weights, mAP {maps[pick]:.5f}) saved to "
        f"{storage.join(config['output'], 'best_model')}")
    results.write_result(config["output"], results.TRAIN_RESULT,
                         results.train_result(spec.name, best, [], done=False))
    return best
