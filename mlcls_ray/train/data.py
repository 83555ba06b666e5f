"""Training and validation Datasets: the one image reader, then the train or eval transform, in CPU tasks.

Rows leave these Datasets as fixed-shape uint8 ``image`` ``[S, S, 3]`` and their class ids ``label_ids``: a row's
labels cost 4 bytes an id in the stream, not C. :class:`TorchBatches` builds the dense ``[B, C]`` target per batch on
the worker, and workers normalise on their device (:class:`mlcls_ray.data.transforms.ModelInput`). Unreadable
images are dropped here with one line per batch naming the first of them, so a bad file never stops training;
``check_dataset`` lists them all.
"""

from __future__ import annotations

import sys

import numpy as np
import ray
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from mlcls_ray.data.labels import dense
from mlcls_ray.data.manifest import Manifest
from mlcls_ray.data.pipeline import read_images
from mlcls_ray.data.transforms import TrainAugment, resize_square

__all__ = ["TorchBatches", "train_dataset", "val_dataset"]

_BATCH = 16  # images per CPU task batch: bounds a task's memory, as in read_images


def _keep_good(batch: dict[str, np.ndarray]) -> np.ndarray:
    good = batch["error_kind"] == ""
    if not good.all():
        first = int(np.flatnonzero(~good)[0])
        print(f"mlcls: skipped {int((~good).sum())} image(s) that cannot be read, e.g. {batch['path'][first]}: "
              f"{batch['error_reason'][first]} (check_dataset lists them all)", file=sys.stderr)
    return good


def _stack(images: list[np.ndarray], size: int) -> np.ndarray:
    return np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)  # [B, S, S, 3]


def _train_batch(batch: dict[str, np.ndarray], augment: str, size: int) -> dict[str, np.ndarray]:
    good = _keep_good(batch)
    transform, rng = TrainAugment(augment, size), np.random.default_rng()
    images = [transform(img, rng) for img in batch["image"][good]]
    return {"image": _stack(images, size), "label_ids": batch["label_ids"][good]}


def _val_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    good = _keep_good(batch)
    images = [resize_square(img, size) for img in batch["image"][good]]
    return {"image": _stack(images, size), "label_ids": batch["label_ids"][good]}


class TorchBatches(NumpyBatchCollateFn):
    """``iter_torch_batches(collate_fn=...)``: a stream batch to ``{"image": [B, S, S, 3] uint8, "labels": [B, C]}``
    tensors, the dense target built here, on the worker's collate threads. Ray pins them (``pin_memory``) and moves
    them to the iterator's ``device``; images stay uint8 until ``ModelInput`` normalises them there.

    Args:
        num_classes: C.
        dtype: of the target, e.g. ``np.float32`` for the loss, ``np.uint8`` for metrics.
    """

    def __init__(self, num_classes: int, dtype: type[np.generic]):
        self.num_classes, self.dtype = num_classes, dtype

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {"image": torch.from_numpy(batch["image"]),  # [B, S, S, 3] uint8
                "labels": torch.from_numpy(dense(batch["label_ids"], self.num_classes, self.dtype))}  # [B, C]


def train_dataset(manifest: Manifest, root: str, *, augment: str, size: int, max_pixels: int,
                  max_file_bytes: int, seed: int, stage: str | None = None) -> ray.data.Dataset:
    """Decoded, augmented training images; rows are shuffled once here, blocks on every epoch. ``stage``: see
    :func:`mlcls_ray.data.pipeline.read_images`."""
    order = np.random.default_rng(seed).permutation(len(manifest))
    images = read_images(manifest, root, image="rgb", max_pixels=max_pixels, max_file_bytes=max_file_bytes,
                         batch_size=_BATCH, shuffle=True, order=order, stage=stage)
    return images.map_batches(_train_batch, fn_kwargs={"augment": augment, "size": size}, batch_size=_BATCH,
                              batch_format="numpy", num_cpus=1)


def val_dataset(manifest: Manifest, root: str, *, size: int, max_pixels: int, max_file_bytes: int,
                stage: str | None = None) -> ray.data.Dataset:
    """Decoded validation images, squish-resized as every inference path does."""
    images = read_images(manifest, root, image="rgb", max_pixels=max_pixels, max_file_bytes=max_file_bytes,
                         batch_size=_BATCH, stage=stage)
    return images.map_batches(_val_batch, fn_kwargs={"size": size}, batch_size=_BATCH, batch_format="numpy",
                              num_cpus=1)
