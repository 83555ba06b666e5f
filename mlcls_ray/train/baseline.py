"""A plain single-process PyTorch loop over the same model, loss, optimiser, schedule and transforms as training.

No Ray: the images are decoded and transformed in this process, one batch at a time. It is the reference the
Ray Train run is checked against (tests: same data, global batch and seed give the same mAP) and timed against
(``jobs/bench_train.py``).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from mlcls_ray import storage
from mlcls_ray.data.images import decode_image
from mlcls_ray.data.manifest import Manifest
from mlcls_ray.data.transforms import ModelInput, TrainAugment, resize_square
from mlcls_ray.metrics import mean_average_precision
from mlcls_ray.models.loss import build_loss
from mlcls_ray.models.zoo import ModelSpec, build_model
from mlcls_ray.train.optim import build_optimizer, build_schedule

__all__ = ["plain_train"]


def _decode(root: str, paths: list[str]) -> list[np.ndarray]:
    return [decode_image(storage.read_bytes(storage.join(root, p))) for p in paths]


def plain_train(spec: ModelSpec, root: str, train: Manifest, val: Manifest, *, epochs: int, batch_size: int,
                lr: float, head_lr: float | None = None, weight_decay: float = 1e-4, warmup_epochs: int = 0,
                lr_scheduler: str = "cosine",
                augment: str = "none", loss: str = "asl", seed: int = 0, threads: int | None = None) -> dict:
    """Train ``epochs`` epochs, reading and decoding each batch's files in this process as a ``DataLoader`` with
    ``num_workers=0`` would; returns ``{"map", "images_per_s", "seconds", "epoch_seconds"}``: training time and
    throughput (reading, decoding and augmenting included), and the final val mAP of the raw weights.
    ``head_lr`` caps the head's rate, as ``Train.head_learning_rate``; None: the head trains at ``lr`` too."""
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model, _ = build_model(spec)
    optimizer = build_optimizer(model, lr, lr if head_lr is None else head_lr, weight_decay)  # head: min(lr, cap)
    paths, labels = train.paths.to_pylist(), train.labels(np.arange(len(train)))
    steps = int(np.ceil(len(paths) / batch_size))
    scheduler = build_schedule(optimizer, lr_scheduler, epochs, steps, warmup_epochs)
    criterion, transform = build_loss(loss), TrainAugment(augment, spec.image_size)
    to_input = ModelInput(spec.mean, spec.std)
    step, started, epoch_seconds = 0, time.perf_counter(), []
    for _ in range(epochs):
        model.train()
        epoch_started = time.perf_counter()
        for batch in np.array_split(rng.permutation(len(paths)), steps):
            images = _decode(root, [paths[i] for i in batch])
            x = torch.from_numpy(np.stack([transform(img, rng) for img in images]))  # [B, S, S, 3] uint8
            y = torch.from_numpy(labels[batch]).float()
            loss_value = criterion(model(to_input(x)), y)
            optimizer.zero_grad(set_to_none=True)
            loss_value.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(step)
        epoch_seconds.append(time.perf_counter() - epoch_started)
    seconds = time.perf_counter() - started
    model.eval()
    val_images = _decode(root, val.paths.to_pylist())
    with torch.no_grad():
        x = torch.from_numpy(np.stack([resize_square(img, spec.image_size) for img in val_images]))
        logits = torch.cat([model(to_input(chunk)) for chunk in x.split(64)])
    return {"map": mean_average_precision(logits.float().numpy(), val.labels(np.arange(len(val)))),
            "images_per_s": epochs * len(paths) / seconds, "seconds": seconds, "epoch_seconds": epoch_seconds}
