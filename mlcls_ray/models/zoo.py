"""The backbone zoo: a timm backbone, a feature tap and the ML-Decoder head, built from a :class:`ModelSpec`.

A spec is data (the ``Arch.*`` keys of a preset YAML, or the ``Model`` section of a model folder), so every mode
rebuilds the same network from it. Pretrained weights come from a local or ``s3://`` file or a hub tag, and are
loaded once on the driver; workers receive the resulting state dict.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import nn

from mlcls_ray import storage
from mlcls_ray.models.ml_decoder import MLDecoder

__all__ = ["TAPS", "MLClassifier", "ModelSpec", "PretrainedError", "build_model", "is_weight_file"]

_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


class PretrainedError(ValueError):
    """Pretrained weights could not be found, fetched or loaded; the message says what to pass instead."""


def _features(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m.forward_features(x)


def _head_last_conv(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m.head.last_conv(m.forward_features(x))  # HGNetV2: the 1x1 conv to 2048 channels, run spatially


def _conv_head(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m.act2(m.norm_head(m.conv_head(m.forward_features(x))))  # LCNet: 512 -> 1280, spatially


def _out_channels(module: nn.Module) -> int:
    return next(c.out_channels for c in module.modules() if isinstance(c, nn.Conv2d))


# tap name -> (features of the backbone, channels it gives)
TAPS: dict[str, tuple[Callable[[nn.Module, torch.Tensor], torch.Tensor], Callable[[nn.Module], int]]] = {
    "features": (_features, lambda m: m.num_features),
    "head.last_conv": (_head_last_conv, lambda m: _out_channels(m.head.last_conv)),
    "conv_head": (_conv_head, lambda m: m.conv_head.out_channels),
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a network, stored in every model folder."""

    name: str  # the preset, e.g. PP-LCNet_x1_0_ML
    backbone: str  # timm model name, e.g. lcnet_100
    tap: str  # a key of TAPS
    num_classes: int
    image_size: int
    num_queries: int = 100  # cap on ML-Decoder queries; min(this, num_classes) are used
    embed_dim: int = 768
    num_layers: int = 1
    num_heads: int = 8
    ffn_dim: int = 2048
    dropout: float = 0.1
    mean: tuple[float, float, float] = _IMAGENET[0]
    std: tuple[float, float, float] = _IMAGENET[1]

    @classmethod
    def create(cls, **fields) -> ModelSpec:
        """A spec whose mean/std are the backbone's own (timm's pretrained config), unless given."""
        if "mean" not in fields:
            cfg = _pretrained_cfg(fields["backbone"])
            fields["mean"], fields["std"] = tuple(cfg.get("mean", _IMAGENET[0])), tuple(cfg.get("std", _IMAGENET[1]))
        return cls(**fields)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})


def _pretrained_cfg(backbone: str) -> dict:
    cfg = timm.models.get_pretrained_cfg(backbone)
    return cfg.to_dict() if cfg is not None else {}


class MLClassifier(nn.Module):
    """Backbone -> tokens ``[B, N, D]`` -> ML-Decoder -> logits ``[B, C]``."""

    def __init__(self, spec: ModelSpec, backbone: nn.Module):
        super().__init__()
        if spec.tap not in TAPS:
            raise ValueError(f"tap {spec.tap!r}: choose one of {', '.join(TAPS)}")
        self.spec = spec
        self.backbone = backbone
        self._tap, channels = TAPS[spec.tap]
        self.head = MLDecoder(spec.num_classes, channels(backbone), num_queries=spec.num_queries,
                              embed_dim=spec.embed_dim, num_layers=spec.num_layers, num_heads=spec.num_heads,
                              ffn_dim=spec.ffn_dim, dropout=spec.dropout)

    def no_weight_decay(self) -> set[str]:
        """The backbone's own exemptions (a ViT's position embedding and CLS token), which timm's optimiser factory
        reads from the model it is given; 1-D parameters are exempt anyway."""
        skip = getattr(self.backbone, "no_weight_decay", lambda: set())()
        return {f"backbone.{name}" for name in skip}

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        f = self._tap(self.backbone, x)
        if f.ndim == 3:  # ViT: [B, prefix + N, D]; the head reads every patch token, not the CLS token
            return f[:, getattr(self.backbone, "num_prefix_tokens", 0):]
        if getattr(self.backbone, "output_fmt", "NCHW") == "NHWC":  # e.g. Swin
            return f.flatten(1, 2)  # [B, H*W, D]
        return f.flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, H*W, C]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.tokens(x)
        if self.training:
            return self.head(tokens)
        # scoring: the head in fp32 under any autocast, since bf16 logits tie and shift mAP and thresholds
        with torch.autocast(x.device.type, enabled=False):
            return self.head(tokens.float())


def _backbone_kwargs(spec: ModelSpec) -> dict:
    kwargs: dict = {"num_classes": 0}
    if _pretrained_cfg(spec.backbone).get("fixed_input_size"):
        kwargs["img_size"] = spec.image_size  # ViTs: the position embedding is resampled to this size
    return kwargs


def is_weight_file(source: str) -> bool:
    """Whether ``Train.pretrain_weight_path`` names a file (else it is a hub tag such as ``openai``)."""
    return storage.is_remote(source) or "/" in source or source.endswith(_WEIGHT_SUFFIXES)


def _hub_backbone(spec: ModelSpec, tag: str) -> nn.Module:
    tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{spec.backbone}.*")]
    if tag not in tags:
        raise PretrainedError(f"Train.pretrain_weight_path: {tag!r} is not a pretrained tag of {spec.backbone} "
                              f"(tags: {', '.join(tags) or 'none'}); or pass a weight file, or None")
    try:
        return timm.create_model(f"{spec.backbone}.{tag}", pretrained=True, **_backbone_kwargs(spec))
    except Exception as exc:  # offline, hub errors, a cache without the file: all end the same way
        generic = f"{spec.backbone}_ML"  # a preset's rate and schedule fine-tune; the generic recipe is from scratch
        scratch = "" if spec.name == generic else f" (with -c {generic}, whose rate and schedule are for that)"
        raise PretrainedError(
            f"cannot fetch {spec.backbone}.{tag} from the model hub ({type(exc).__name__}); this machine may be "
            "offline. Pass a file with -o Train.pretrain_weight_path=/path/or/s3://bucket/weights.safetensors "
            f"(a timm or open_clip state dict), or -o Train.pretrain_weight_path=None to train from scratch{scratch}"
        ) from None


def _file_backbone(spec: ModelSpec, uri: str) -> nn.Module | dict:
    """A backbone loaded from a file through timm's own filters (OpenAI CLIP key names, position-embedding
    resampling), or, for a file of this project's whole models, its state dict."""
    try:
        data = storage.read_bytes(uri)
    except storage.StorageError as exc:
        raise PretrainedError(f"Train.pretrain_weight_path: {exc}") from None
    with tempfile.TemporaryDirectory(prefix="mlcls-weights-") as tmp:
        local = Path(tmp) / Path(uri).name
        local.write_bytes(data)
        try:
            state = timm.models.load_state_dict(str(local), weights_only=True)
        except Exception as exc:
            raise PretrainedError(f"Train.pretrain_weight_path: {uri} is not a safetensors or torch state dict "
                                  f"({type(exc).__name__}: {_one_line(exc)})") from None
        if any(k.startswith("head.query_embed") for k in state):  # a whole MLClassifier (e.g. COCO-trained)
            return state
        try:
            backbone = timm.create_model(spec.backbone, pretrained=True, pretrained_strict=False,
                                         pretrained_cfg_overlay={"file": str(local), "num_classes": 0},
                                         **_backbone_kwargs(spec))
        except Exception as exc:
            raise PretrainedError(f"Train.pretrain_weight_path: {uri} does not fit {spec.backbone} "
                                  f"({type(exc).__name__}: {_one_line(exc)})") from None
    if not _took_any(backbone, state):  # non-strict loading skips names it does not know, silently
        theirs = [k for k, t in state.items() if isinstance(t, torch.Tensor) and t.ndim >= 2][:2]
        ours = [k for k, t in backbone.named_parameters() if t.ndim >= 2][:2]
        raise PretrainedError(
            f"Train.pretrain_weight_path: no tensor of {uri} was loaded into {spec.backbone}: its names "
            f"({', '.join(theirs)}, ...) are not the backbone's ({', '.join(ours)}, ...). Save the backbone's own "
            "state_dict (timm or open_clip names, no prefix such as model.)")
    return backbone


def _one_line(exc: Exception, limit: int = 400) -> str:
    """An exception's text on one line, cut short (load_state_dict lists every mismatch on its own line)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _took_any(backbone: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Whether any weight matrix or kernel of ``backbone`` equals a tensor of ``state``, by value: timm's filters
    may rename keys (OpenAI CLIP), so names cannot be compared. Random init never equals a saved tensor."""
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for t in state.values():
        if isinstance(t, torch.Tensor) and t.ndim >= 2:
            by_shape.setdefault(tuple(t.shape), []).append(t)
    return any(torch.equal(p, t.to(p.dtype)) for p in backbone.parameters() if p.ndim >= 2
               for t in by_shape.get(tuple(p.shape), ()))


def _load_matching(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Load the tensors whose names and shapes match; return notes on the ones skipped."""
    own = model.state_dict()
    fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(k for k in state if k not in fits)
    if not any(k.startswith("backbone.") for k in fits):
        raise PretrainedError(f"Train.pretrain_weight_path: {source} is a whole model, but none of its backbone "
                              f"tensors fit {model.spec.backbone}; pass weights of the same backbone, or None")
    model.load_state_dict(fits, strict=False)
    return [f"{source}: skipped {len(skipped)} tensor(s) whose name or shape does not fit this model "
            f"(e.g. {', '.join(skipped[:3])})"] if skipped else []


def build_model(spec: ModelSpec, pretrained: str | None = None) -> tuple[MLClassifier, list[str]]:
    """Build the network; returns (model, notes on pretrained loading).

    Args:
        spec: what to build.
        pretrained: None (random init), a hub tag of the backbone (``ssld_stage1_in22k_in1k``, ``openai``), or a
            local or ``s3://`` file: a timm/open_clip backbone state dict, or a whole model of this project (its
            head tensors that do not fit, e.g. another class count, are skipped with a note, as PaddleX does).

    Raises:
        PretrainedError: the weights cannot be fetched or do not fit.
    """
    notes: list[str] = []
    whole: dict | None = None
    if pretrained is None:
        backbone = timm.create_model(spec.backbone, pretrained=False, **_backbone_kwargs(spec))
    elif is_weight_file(pretrained):
        loaded = _file_backbone(spec, pretrained)
        if isinstance(loaded, dict):
            whole = loaded
            backbone = timm.create_model(spec.backbone, pretrained=False, **_backbone_kwargs(spec))
        else:
            backbone = loaded
    else:
        backbone = _hub_backbone(spec, pretrained)
    model = MLClassifier(spec, backbone)
    if whole is not None:
        notes += _load_matching(model, whole, pretrained)
    if pretrained is not None:
        notes.append(f"loaded pretrained weights from {pretrained}")
    return model, notes
