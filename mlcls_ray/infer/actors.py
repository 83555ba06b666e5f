"""The inference actor pool's resources, one rule for evaluate and label: a GPU each, or half a node's CPUs."""

from __future__ import annotations

import ray
from ray.data import ActorPoolStrategy

from mlcls_ray.config import device_count
from mlcls_ray.train.run import short_of

__all__ = ["inference_actors"]


def inference_actors(device: str, concurrency: int | None = None) -> dict:
    """``map_batches`` arguments of a Predictor actor pool for ``Global.device``.

    On GPUs: ``concurrency`` actors (default one per GPU of ``gpu:0,1``), one GPU each. On CPU: ``concurrency``
    actors (default 1), each reserving half of one node's CPUs, so the other half can decode, but running torch on
    its share of every core: inference is most of the work, and decoding tasks take the cores it leaves idle, as a
    DataLoader's workers share the cores with the model's threads. Returns ``compute``, ``num_gpus`` or
    ``num_cpus``, and the ``fn_constructor_kwargs`` ``threads`` and ``device`` for the actor class.
    """
    if device.startswith("gpu"):
        size = concurrency or device_count(device)
        have = ray.cluster_resources().get("GPU", 0)
        if have < 1:
            short_of(f"Global.device={device} asks for GPUs, but the Ray cluster has {have:g}",
                     "use -o Global.device=cpu", "GPU")
        return {"compute": ActorPoolStrategy(size=size), "num_gpus": 1,
                "fn_constructor_kwargs": {"threads": 1, "device": "cuda"}}
    node_cpus = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=2)
    size = concurrency or 1
    return {"compute": ActorPoolStrategy(size=size), "num_cpus": max(1, int(node_cpus) // 2),
            "fn_constructor_kwargs": {"threads": max(1, int(node_cpus) // size), "device": "cpu"}}
