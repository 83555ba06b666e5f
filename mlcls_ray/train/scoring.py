"""Validation scores during training: every rank scores its share of the val stream, rank 0 gathers the rows.

Scores are fp32 logits (mAP on fp32, never on fp16 ties), kept on the device until the shard is done and copied to
the host once; labels never leave the host. The gather runs over a gloo group on CPU tensors, so val scores never
take GPU memory from the model.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from mlcls_ray.data.transforms import ModelInput

__all__ = ["gather_rows", "score_shard"]


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
    for batch in shard.iter_torch_batches(batch_size=batch_size, dtypes={"image": torch.uint8,  # [ray]
                                                                          "labels": torch.uint8}):
        x = to_input(batch["image"].to(device, non_blocking=True))
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            for out, m in zip(logits, models):
                out.append(m(x).float())
        labels.append(batch["labels"].numpy())
    scores = [torch.cat(o).cpu().numpy() if o else np.zeros((0, num_classes), np.float32) for o in logits]
    return scores, np.concatenate(labels) if labels else np.zeros((0, num_classes), np.uint8)


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
