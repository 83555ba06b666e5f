"""A plain single-process PyTorch loop over the same model, loss, optimiser, schedule and transforms as training.

No Ray: the images are decoded and transformed in this process, one batch at a time. It is the reference the
Ray Train run is checked against (tests: same data, global batch and seed give the same mAP) and timed against
(``jobs/bench_train.py``).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from mlcls_ray import storage
from mlcls_ray.data.images import decode_image
from mlcls_ray.data.manifest import Manifest
from mlcls_ray.data.transforms import TrainAugment, resize_square, to_model_input
from mlcls_ray.metrics import mean_average_precision
from mlcls_ray.models.loss import build_loss
from mlcls_ray.models.zoo import ModelSpec, build_model

__all__ = ["decode_all", "plain_train"]


def decode_all(manifest: Manifest, root: str) -> tuple[list[np.ndarray], np.ndarray]:
    """Every image of a manifest decoded in this process, and its ``[N, C]`` labels."""
    images = [decode_image(storage.read_bytes(storage.join(root, p))) for p in manifest.paths.to_pylist()]
    return images, manifest.labels(np.arange(len(manifest)))


def plain_train(spec: ModelSpec, train: tuple[list[np.ndarray], np.ndarray], val: tuple[list[np.ndarray], np.ndarray],
                *, epochs: int, batch_size: int, lr: float, weight_decay: float = 1e-4, warmup_epochs: int = 0,
                augment: str = "none", loss: str = "asl", seed: int = 0, threads: int | None = None) -> dict:
    """Train ``epochs`` epochs on decoded images; returns ``{"map", "images_per_s", "seconds"}`` (training time
    only, decode and augmentation of each batch included; the final val mAP of the raw weights)."""
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model, _ = build_model(spec)
    optimizer = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=weight_decay)
    images, labels = train
    steps = int(np.ceil(len(images) / batch_size))
    scheduler = CosineLRScheduler(optimizer, t_initial=epochs * steps, lr_min=1e-10, warmup_t=warmup_epochs * steps,
                                  warmup_lr_init=1e-6, t_in_epochs=False)
    criterion, transform = build_loss(loss), TrainAugment(augment, spec.image_size)
    step, started = 0, time.perf_counter()
    for _ in range(epochs):
        model.train()
        for batch in np.array_split(rng.permutation(len(images)), steps):
            x = torch.from_numpy(np.stack([transform(images[i], rng) for i in batch]))  # [B, S, S, 3] uint8
            y = torch.from_numpy(labels[batch]).float()
            loss_value = criterion(model(to_model_input(x, spec.mean, spec.std)), y)
            optimizer.zero_grad(set_to_none=True)
            loss_value.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(step)
    seconds = time.perf_counter() - started
    model.eval()
    val_images, val_labels = val
    with torch.no_grad():
        x = torch.from_numpy(np.stack([resize_square(img, spec.image_size) for img in val_images]))
        logits = torch.cat([model(to_model_input(chunk, spec.mean, spec.std)) for chunk in x.split(64)])
    return {"map": mean_average_precision(logits.float().numpy(), val_labels),
            "images_per_s": epochs * len(images) / seconds, "seconds": seconds}
