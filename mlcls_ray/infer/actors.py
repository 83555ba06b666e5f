"""The inference actor pool's resources, one rule for evaluate and label: a GPU each, or a share of half the CPUs."""

from __future__ import annotations

import math

import ray
from ray.data import ActorPoolStrategy

from mlcls_ray.config import device_count
from mlcls_ray.devices import short_of, torch_device

__all__ = ["inference_actors"]


def inference_actors(device: str, concurrency: int | None = None) -> dict:
    """``map_batches`` arguments of a Predictor actor pool for ``Global.device``.

    On GPUs, one GPU an actor. ``gpu:0,1`` is a pool of ``concurrency`` actors (default: as many as it names). Plain
    ``gpu`` starts one actor per GPU the cluster has and adds more as GPUs join (an autoscaling cluster), up to
    ``concurrency`` when it is set.

    On CPU: ``concurrency`` actors (default 1) that together reserve half of one node's CPUs, so the decoding tasks
    always have the other half wherever the actors land (Ray Data hangs when actors hold every CPU), but each
    runs torch on its share of every core of its node: inference is most of the work, and decoding tasks take the
    cores it leaves idle, as a DataLoader's workers share the cores with the model's threads.

    Returns ``compute``, ``num_gpus`` or ``num_cpus``, and the ``fn_constructor_kwargs`` ``threads`` and ``device``
    (a torch device) for the actor class.
    """
    kwargs = {"device": torch_device(device, ray_assigned=True)}
    if device.startswith("gpu"):
        have = int(ray.cluster_resources().get("GPU", 0))
        if have < 1:
            short_of(f"Global.device={device} asks for GPUs, but the Ray cluster has none",
                     "use -o Global.device=cpu", "GPU")
        if ":" in device:
            pool = ActorPoolStrategy(size=concurrency or device_count(device))
        else:
            pool = ActorPoolStrategy(min_size=1, max_size=concurrency,
                                     initial_size=max(1, min(have, concurrency or have)))
        return {"compute": pool, "num_gpus": 1, "fn_constructor_kwargs": {**kwargs, "threads": 1}}
    node_cpus = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=2)
    size = concurrency or 1
    share = math.floor(node_cpus / 2 / size * 1000) / 1000  # Ray counts CPUs in steps of 1e-4
    return {"compute": ActorPoolStrategy(size=size), "num_cpus": max(share, 0.001),
            "fn_constructor_kwargs": {**kwargs, "threads": max(1, int(node_cpus) // size)}}
