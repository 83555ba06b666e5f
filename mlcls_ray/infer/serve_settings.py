"""The serving endpoint's settings: what ``build_app`` takes (the presets' ``Serve`` section, a YAML's args, or
strings from ``serve run ... key=value``), checked all at once, and the one mapping from them to Serve's replicas,
batching and autoscaling (:func:`deployment_options`)."""

# no `from __future__ import annotations`: from_args coerces each value to its field's type, read at runtime
import dataclasses
import math
import re
import types
from collections.abc import Callable
from typing import Any

from mlcls_ray import storage
from mlcls_ray.config import Config
from mlcls_ray.infer.fetch import DEFAULT_PORTS, parse_networks, parse_ports

__all__ = ["SERVE_MAX_PIXELS", "ServeSettings", "deployment_options", "settings_from_config"]

SERVE_MAX_PIXELS = 25_000_000  # a request's image, not a dataset's: 75 MB decoded, where 89.5 MP would be 270 MB


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """Everything the app takes; ``build_app``'s args use these names. Defaults are the presets' ``Serve`` section
    (a test keeps them equal)."""

    model_dir: str
    device: str = "cpu"  # cpu | gpu | gpu:0,1 as Global.device; on a GPU each replica takes one
    cpus_per_replica: float | None = None  # None: 1 with a GPU, 0.5 on CPU; torch threads follow it on CPU
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.05
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 16.0
    max_request_bytes: int = 32 << 20
    max_image_bytes: int = 20 << 20
    max_image_pixels: int = SERVE_MAX_PIXELS
    max_images_per_request: int = 64
    decode_threads: int = 4
    visualize: bool = False
    allow_urls: bool = False
    url_timeout_s: float = 5.0
    url_ports: tuple[int, ...] = DEFAULT_PORTS
    url_allow_networks: tuple[str, ...] = ()
    fetch_threads: int = 8
    auth_token_env: str | None = None

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("gpu")

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> "ServeSettings":
        """Settings from a builder's args (typed YAML, or strings from ``serve run ... key=value``).

        Raises:
            ValueError: an unknown key, a missing ``model_dir``, or a value of the wrong type; every problem at once.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        problems = [f"unknown arg {k!r}; the args are {', '.join(fields)}" for k in args if k not in fields]
        if not args.get("model_dir"):
            problems.append("model_dir is required: the model folder to serve (local or s3://)")
        values = {}
        for name, value in args.items():
            if name not in fields or name == "model_dir":
                continue
            try:
                values[name] = _LISTS[name](value) if name in _LISTS else _coerce(value, fields[name].type)
            except ValueError as exc:
                problems.append(f"{name}={value!r}: {exc}" if name in _LISTS
                                else f"{name}={value!r} is not a {_type_name(fields[name].type)}")
        if "device" in values and not re.fullmatch(r"cpu|gpu(:\d+(,\d+)*)?", values["device"]):
            problems.append(f"device={values['device']!r}: use cpu, gpu or gpu:0,1")
        if problems:
            raise ValueError("mlcls_ray.infer.serve:build_app: " + "; ".join(problems))
        return cls(model_dir=storage.absolute(args["model_dir"]), **values)


_LISTS: dict[str, Callable[[Any], tuple]] = {"url_ports": lambda v: tuple(parse_ports(v)),
                                             "url_allow_networks": lambda v: tuple(parse_networks(v))}


def _type_name(kind: Any) -> str:
    return str(kind) if isinstance(kind, types.UnionType) else kind.__name__


def _coerce(value: Any, kind: Any) -> Any:
    if isinstance(kind, types.UnionType):  # X | None
        if value is None or isinstance(value, str) and value.strip().lower() in ("", "none", "null"):
            return None
        kind = next(k for k in kind.__args__ if k is not type(None))
    if kind is bool:
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if not isinstance(value, bool):
            raise ValueError(value)
        return value
    if isinstance(value, bool):  # bool is an int; True is no batch size
        raise ValueError(value)
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    return kind(value)


def settings_from_config(cfg: Config) -> ServeSettings:
    """The ``Serve`` section (plus ``Global.device``) as :class:`ServeSettings`."""
    model = cfg["Serve.model_dir"] or storage.join(cfg["Global.output"], "best_model")
    keys = ("cpus_per_replica", "max_batch_size", "batch_wait_timeout_s", "min_replicas", "max_replicas",
            "target_ongoing_requests", "max_request_bytes", "max_image_bytes", "max_image_pixels",
            "max_images_per_request", "decode_threads", "visualize", "allow_urls", "url_timeout_s", "fetch_threads",
            "auth_token_env")
    return ServeSettings(model_dir=storage.absolute(model), device=cfg["Global.device"],
                         url_ports=tuple(cfg["Serve.url_ports"]),
                         url_allow_networks=tuple(cfg["Serve.url_allow_networks"]),
                         **{k: cfg[f"Serve.{k}"] for k in keys})


def deployment_options(s: ServeSettings) -> dict[str, Any]:
    """Replica resources, concurrency, autoscaling and batching for ``Deployment.options``: the one mapping."""
    # on CPU a small reservation by default, so a replica fits beside other work on a small node
    cpus = s.cpus_per_replica if s.cpus_per_replica is not None else 1 if s.on_gpu else 0.5
    return {
        # Serve's default of 5 ongoing requests would cap every batch at 5; leave room for two full batches
        "max_ongoing_requests": max(2 * s.max_batch_size, math.ceil(s.target_ongoing_requests)),
        "autoscaling_config": {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                               "target_ongoing_requests": s.target_ongoing_requests},
        "ray_actor_options": {"num_gpus": 1, "num_cpus": cpus} if s.on_gpu else {"num_cpus": cpus},
        # applied by reconfigure(), so `serve deploy` can retune batching without reloading the model
        "user_config": {"max_batch_size": s.max_batch_size, "batch_wait_timeout_s": s.batch_wait_timeout_s},
    }
