"""``Global.device`` at run time: the torch device a process computes on, and what to do when the Ray cluster lacks
the devices or CPUs a run asks for. Training, evaluation, predict, label and serve share these rules."""

from __future__ import annotations

import os
import sys

__all__ = ["DeviceError", "short_of", "torch_device"]


class DeviceError(ValueError):
    """``Global.device`` asks for what this machine or Ray cluster does not have; the message says what to change."""


def torch_device(device: str, ray_assigned: bool = False) -> str:
    """``Global.device`` -> a torch device: ``cpu``; ``cuda`` for ``gpu``; ``cuda:1`` for ``gpu:1,2`` (its first GPU).

    Args:
        device: ``cpu``, ``gpu`` or ``gpu:0,1`` (PaddleX style).
        ray_assigned: for a Ray actor or replica that asked Ray for one GPU: Ray makes the GPU it assigned the only
            one the process sees, so it is ``cuda`` whatever ids ``device`` names. It is not looked for here: the
            caller may be a driver without a GPU deciding for an actor on another node.

    Raises:
        DeviceError: a GPU is asked for outside Ray and torch sees none.
    """
    if not device.startswith("gpu"):
        return "cpu"
    if ray_assigned:
        return "cuda"
    import torch

    if not torch.cuda.is_available():
        raise DeviceError(f"Global.device={device}, but torch sees no CUDA device here; use -o Global.device=cpu")
    return f"cuda:{device.split(':', 1)[1].split(',')[0]}" if ":" in device else "cuda"


def short_of(message: str, fix: str, kind: str) -> None:
    """The cluster lacks what a run asks for: an embedded local Ray never grows, so stop; a cluster may autoscale, so
    say what it waits for.

    Raises:
        DeviceError: outside a cluster (no ``RAY_ADDRESS``), with ``message`` and ``fix``.
    """
    if not os.environ.get("RAY_ADDRESS"):
        raise DeviceError(f"{message}; {fix}")
    print(f"mlcls: {message}; {fix}; waiting for the autoscaler to add {kind} nodes", file=sys.stderr)
