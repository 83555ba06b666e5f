"""Validation scores during training: every rank scores its share of the val stream, then the ranks trade columns.

Scores are fp32 logits (mAP on fp32, never on fp16 ties), kept on the device until the shard is done and copied to
the host once. Then one all-to-all gives each rank its block of classes for every val row (:func:`to_class_block`),
so each holds about N x C / world scores and computes its classes' metrics; only C numbers go to rank 0
(:func:`gather_rows`). The exchanges run over a gloo group on CPU tensors, so val scores never take GPU memory from
the model.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from mlcls_ray.data.transforms import ModelInput
from mlcls_ray.train.data import TorchBatches

__all__ = ["broadcast_from_rank0", "class_block", "gather_rows", "score_shard", "sum_over_ranks",
           "to_class_block"]

_EXCHANGE_BYTES = 64 << 20  # what a rank sends in one round of :func:`to_class_block`


def _sync_from_rank0(module: torch.nn.Module) -> None:
    """Give every rank rank 0's weights and buffers. DDP keeps parameters equal, but each rank's BatchNorm
    statistics (and so its EMA copy) move with its own last batch; scoring must use the model that is saved."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


@torch.no_grad()
def score_shard(models: list[torch.nn.Module], shard, to_input: ModelInput, device: torch.device,
                batch_size: int, amp: torch.dtype | None, num_classes: int) -> tuple[list[np.ndarray], np.ndarray]:
    """fp32 logits ``[N, C]`` of each model over this worker's val rows, and their labels; one decode feeds every
    model."""
    for m in models:
        _sync_from_rank0(m)
        m.eval()
    logits: list[list[torch.Tensor]] = [[] for _ in models]
    labels = []
    # [ray] labels stay on the host, dense uint8 [B, C] per batch
    for batch in shard.iter_torch_batches(batch_size=batch_size, collate_fn=TorchBatches(num_classes, np.uint8),
                                          device="cpu"):
        x = to_input(batch["image"].to(device, non_blocking=True))
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            for out, m in zip(logits, models):
                out.append(m(x).float())
        labels.append(batch["labels"].numpy())
    scores = [torch.cat(o).cpu().numpy() if o else np.zeros((0, num_classes), np.float32) for o in logits]
    return scores, np.concatenate(labels) if labels else np.zeros((0, num_classes), np.uint8)


def _rank_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def class_block(num_classes: int, rank: int, world: int) -> slice:
    """The classes a rank owns: contiguous, in rank order, sizes differing by at most one."""
    return slice(rank * num_classes // world, (rank + 1) * num_classes // world)


def sum_over_ranks(values: list[int], group: dist.ProcessGroup | None) -> list[int]:
    """Element-wise sums of every rank's integers."""
    t = torch.tensor(values, dtype=torch.int64)
    if _rank_world(group)[1] > 1:
        dist.all_reduce(t, group=group)
    return t.tolist()


def broadcast_from_rank0(value: int, group: dist.ProcessGroup | None) -> int:
    """Rank 0's integer, on every rank."""
    t = torch.tensor([value], dtype=torch.int64)
    if _rank_world(group)[1] > 1:
        dist.broadcast(t, src=0, group=group)
    return int(t)


def to_class_block(local: np.ndarray, group: dist.ProcessGroup | None) -> np.ndarray:
    """This rank's block of classes (:func:`class_block`) for every rank's rows: ``[n_r, C]`` on each rank in,
    ``[N, C_r]`` out, rows in rank order. All-to-alls (gloo implements ``all_to_all_single`` with uneven splits)
    move a few classes of every block a round, so the buffers beside ``local`` and the answer stay near 64 MB.
    With one process, ``local`` itself."""
    rank, world = _rank_world(group)
    if world == 1:
        return local
    n, c = local.shape
    rows = sum_over_ranks([n if r == rank else 0 for r in range(world)], group)
    total, blocks = sum(rows), [class_block(c, r, world) for r in range(world)]
    out = np.empty((total, blocks[rank].stop - blocks[rank].start), local.dtype)  # [N, C_r]
    rounds = max(1, min(c // world, -(-total * c * local.itemsize // (world * _EXCHANGE_BYTES))))  # equal on all
    dtype = torch.from_numpy(local[:0]).dtype
    for k in range(rounds):
        parts = [class_block(b.stop - b.start, k, rounds) for b in blocks]  # round k's share of each block
        subs = [slice(b.start + p.start, b.start + p.stop) for b, p in zip(blocks, parts)]
        widths = [s.stop - s.start for s in subs]
        send = np.concatenate([local[:, s].ravel() for s in subs])  # [n, w_0], [n, w_1]...: each rank's, row-major
        received = torch.empty(total * widths[rank], dtype=dtype)
        dist.all_to_all_single(received, torch.from_numpy(send), output_split_sizes=[r * widths[rank] for r in rows],
                               input_split_sizes=[n * w for w in widths], group=group)
        out[:, parts[rank]] = received.numpy().reshape(total, widths[rank])  # each rank's [n_r, w] in rank order
    return out


def gather_rows(local: np.ndarray, group: dist.ProcessGroup | None) -> np.ndarray | None:
    """Concatenate every rank's rows on rank 0 (None elsewhere); shards may differ in length, padding is trimmed."""
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
