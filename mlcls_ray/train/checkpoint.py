"""Training checkpoints: ``state.pt`` (weights, optimiser, EMA, scaler, progress) and ``meta.json`` beside it.

``meta.json`` is small and says what produced the state: the network (:class:`~mlcls_ray.models.zoo.ModelSpec`),
the worker count and the steps per epoch. The driver reads it before any worker starts, so resuming another model
stops at once with one line, and a resume on another worker count places the learning-rate schedule by epochs.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from mlcls_ray import storage
from mlcls_ray.models.zoo import ModelSpec

__all__ = ["META_FILE", "STATE_FILE", "ResumeError", "check_resumable", "load_state", "read_meta", "resume_step", "save"]

STATE_FILE = "state.pt"
META_FILE = "meta.json"


class ResumeError(ValueError):
    """The checkpoint cannot continue this run; the message says why and what to do."""


def save(folder: Path, state: dict, spec: ModelSpec, world_size: int, steps_per_epoch: int) -> None:
    """Write a checkpoint into a local ``folder`` (Ray Train uploads it)."""
    torch.save(state, folder / STATE_FILE)
    meta = {"spec": spec.to_dict(), "world_size": world_size, "steps_per_epoch": steps_per_epoch,
            "epoch": state["epoch"], "step": state["step"]}
    (folder / META_FILE).write_text(json.dumps(meta, indent=1))


def load_state(uri: str) -> dict:
    """A checkpoint's training state; ``uri`` is the checkpoint folder (local or ``s3://``)."""
    return torch.load(io.BytesIO(storage.read_bytes(storage.join(uri, STATE_FILE))), map_location="cpu",
                      weights_only=True)


def read_meta(uri: str) -> dict | None:
    """The checkpoint's ``meta.json``, or None for a checkpoint written before it existed."""
    path = storage.join(uri, META_FILE)
    return json.loads(storage.read_text(path)) if storage.exists(path) else None


def check_resumable(uri: str, spec: ModelSpec) -> None:
    """Refuse a checkpoint of another network (backbone, head sizes, classes or image size) than ``spec``."""
    meta = read_meta(uri)
    if meta is None:
        return
    theirs, ours = meta["spec"], spec.to_dict()
    differ = [k for k in ours if k != "name" and theirs.get(k) != ours[k]]
    if differ:
        shown = ", ".join(f"{k} {theirs.get(k)!r} vs {ours[k]!r}" for k in differ[:4])
        raise ResumeError(f"Train.resume_path: {uri} is a checkpoint of {theirs.get('name')} and does not fit "
                          f"{spec.name} as configured ({shown}); resume with the config it was trained with, or "
                          "start afresh with -o Train.resume_path=None")


def resume_step(state: dict, steps_per_epoch: int) -> int:
    """The schedule step to continue from: checkpoints are taken at epoch ends, so ``epoch x steps_per_epoch`` of
    this run's workers, which equals the saved step when the worker count is the same."""
    return state["epoch"] * steps_per_epoch
