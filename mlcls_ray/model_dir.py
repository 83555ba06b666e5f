"""The self-contained model folder (``best_model/``): ``model.safetensors`` and a PaddleX-shaped ``inference.yml``.

Training writes it here and nowhere else; evaluate, export, predict, label and serve load it with :func:`load` and
nothing else. ``inference.yml`` keeps PaddleX's layout (``Global.model_name``, ``PreProcess.transform_ops``,
``PostProcess.MultiLabelThreshOutput``) and adds a ``Model`` section with what rebuilds the network. The image
size and mean/std are read back from the ``PreProcess`` ops, so the preprocessing a folder declares is the one used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from mlcls_ray import storage
from mlcls_ray.models.zoo import MLClassifier, ModelSpec, build_model

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "ModelInfo", "load", "read_info", "save"]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "inference.yml"
_FROM_PREPROCESS = ("image_size", "mean", "std")


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a model folder declares besides its weights."""

    spec: ModelSpec
    label_names: list[str]
    thresholds: list[float]  # per class; the decision rule is score > threshold (PaddleX 3.x)
    extra: dict  # provenance written by training (epoch, mAP, which weights), shown, never needed


def _inference_yml(info: ModelInfo) -> str:
    spec = info.spec
    doc = {
        "Global": {"model_name": spec.name},
        "PreProcess": {"transform_ops": [
            {"ResizeImage": {"size": [spec.image_size, spec.image_size], "interpolation": "bilinear",
                             "backend": "pil"}},
            {"NormalizeImage": {"scale": 1 / 255, "mean": list(spec.mean), "std": list(spec.std), "order": "",
                                "channel_num": 3}},
            {"ToCHWImage": None},
        ]},
        "PostProcess": {"MultiLabelThreshOutput": {"threshold": [round(float(t), 6) for t in info.thresholds],
                                                   "label_list": list(info.label_names)}},
        "Model": {k: v for k, v in spec.to_dict().items() if k not in _FROM_PREPROCESS},
        "Provenance": info.extra,
    }
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


def save(uri: str, spec: ModelSpec, state_dict: Mapping[str, torch.Tensor], label_names: Sequence[str],
         thresholds: Sequence[float], extra: dict | None = None) -> None:
    """Write a model folder (local or ``s3://``). Each file is replaced atomically; weights are written first."""
    if len(label_names) != spec.num_classes or len(thresholds) != spec.num_classes:
        raise ValueError(f"{spec.num_classes} classes, but {len(label_names)} names and {len(thresholds)} thresholds")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    storage.write_bytes(storage.join(uri, WEIGHTS_FILE), save_safetensors(tensors, {"format": "pt"}))
    info = ModelInfo(spec, list(label_names), [float(t) for t in thresholds], dict(extra or {}))
    storage.write_text(storage.join(uri, CONFIG_FILE), _inference_yml(info))


def _op(ops: list, name: str) -> dict:
    for op in ops:
        if isinstance(op, dict) and name in op:
            return op[name]
    raise ValueError(f"PreProcess.transform_ops has no {name}")


def read_info(uri: str) -> ModelInfo:
    """Parse ``inference.yml`` of a model folder.

    Raises:
        ValueError: the folder is missing, or its ``inference.yml`` is not one this project wrote.
    """
    path = storage.join(uri, CONFIG_FILE)
    try:
        doc = yaml.safe_load(storage.read_text(path))
    except storage.StorageError as exc:
        raise ValueError(f"{uri} is not a model folder: {exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc})") from None
    try:
        ops = doc["PreProcess"]["transform_ops"]
        resize, norm = _op(ops, "ResizeImage"), _op(ops, "NormalizeImage")
        size = resize["size"]
        post = doc["PostProcess"]["MultiLabelThreshOutput"]
        spec = ModelSpec.from_dict({**doc["Model"], "image_size": int(size[0] if isinstance(size, list) else size),
                                    "mean": norm["mean"], "std": norm["std"]})
        names, threshold = [str(n) for n in post["label_list"]], post["threshold"]
        thresholds = ([float(threshold)] * len(names) if isinstance(threshold, (int, float))
                      else [float(t) for t in threshold])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a model folder written by mlcls ({type(exc).__name__}: {exc}); "
                         "train one, or point at the best_model/ folder of a training run") from None
    if len(thresholds) != spec.num_classes or len(names) != spec.num_classes:
        raise ValueError(f"{path}: {spec.num_classes} classes, but {len(names)} labels and {len(thresholds)} "
                         "thresholds")
    return ModelInfo(spec, names, thresholds, doc.get("Provenance") or {})


def load(uri: str, device: str | torch.device = "cpu") -> tuple[MLClassifier, ModelInfo]:
    """Rebuild the network of a model folder, in eval mode on ``device``."""
    info = read_info(uri)
    try:
        model, _ = build_model(info.spec)
    except (RuntimeError, ValueError) as exc:  # timm's unknown model, or a tap that is not one of TAPS
        raise ValueError(f"{storage.join(uri, CONFIG_FILE)}: its Model section does not build ({exc})") from None
    weights = storage.join(uri, WEIGHTS_FILE)
    try:
        model.load_state_dict(load_safetensors(storage.read_bytes(weights)))
    except (storage.StorageError, SafetensorError, RuntimeError) as exc:  # missing, corrupt, or another network's
        reason = " ".join(str(exc).split())  # load_state_dict lists one mismatch per line
        raise ValueError(f"{weights}: cannot load the weights ({type(exc).__name__}: {reason[:500]})") from None
    return model.to(device).eval(), info
