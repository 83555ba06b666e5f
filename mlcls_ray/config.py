"""The one config system: PaddleX key names, the packaged YAMLs as the only source of defaults, ``-o`` overrides.

A config is a flat mapping of dotted keys (``Global.mode``) to values. :data:`SCHEMA` says what each key accepts;
the YAMLs under ``mlcls_ray/configs/`` give every key its default: the base ``_timm_ML.yaml`` holds every key, and
each preset YAML only what differs for its model. Validation collects every problem and raises one
:class:`ConfigError`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from mlcls_ray import storage
from mlcls_ray.data.images import MAX_PIXELS_CEILING
from mlcls_ray.infer import fetch, thresholds

__all__ = ["SCHEMA", "Config", "ConfigError", "Key", "device_count", "list_presets", "load_config",
           "parse_override"]

MODES = ("check_dataset", "train", "evaluate", "export", "predict", "label", "serve", "audit")
_DATASET_MODES = ("check_dataset", "train", "evaluate", "audit")  # the modes that read Global.dataset_dir
_BASE = "_timm_ML"  # every preset's base, and the whole recipe of any timm backbone named as `-c <timm_name>_ML`


class ConfigError(ValueError):
    """Bad config input. Each entry of ``problems`` is one line naming the key, the value and what is allowed."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Key:
    """What one config key accepts."""

    type: type
    help: str
    nullable: bool = False
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    pattern: str | None = None
    pattern_help: str = ""
    parse: Any = None  # for structured values (thresholds): text or parsed YAML -> the value, or raises ValueError


_PATH = "a local path or s3://bucket/prefix"
_THRESHOLD = ("a number, a list of one per class, or {default: 0.5, <id or name>: t}; null = the model folder's "
              "calibrated per-class thresholds")

SCHEMA: dict[str, Key] = {
    "Global.model": Key(str, "model preset name"),
    "Global.mode": Key(str, "what to run", choices=MODES),
    "Global.dataset_dir": Key(str, f"dataset root, {_PATH}", nullable=True),
    "Global.device": Key(str, "cpu, gpu, or gpu:0,1 (PaddleX style)", pattern=r"cpu|gpu(:\d+(,\d+)*)?",
                         pattern_help="cpu, gpu or gpu:0,1,..."),
    "Global.output": Key(str, f"output folder, {_PATH}"),
    "Global.max_image_pixels": Key(int, "images with more pixels are rejected (decompression bombs)", min=1,
                                   max=MAX_PIXELS_CEILING),
    "Global.max_file_bytes": Key(int, "image files larger than this are rejected before they are read", min=1),
    "CheckDataset.convert.enable": Key(bool, "convert the dataset to MLClsDataset before checking"),
    "CheckDataset.convert.src_dataset_type": Key(str, "source format", nullable=True, choices=("COCO",)),
    "CheckDataset.convert.list_format": Key(str, "the lists convert writes: txt (PaddleX's) or parquet (sparse)",
                                            choices=("txt", "parquet")),
    "CheckDataset.split.enable": Key(bool, "re-split train/val with iterative stratification"),
    "CheckDataset.split.train_percent": Key(int, "train share in percent", nullable=True, min=1, max=99),
    "CheckDataset.split.val_percent": Key(int, "val share in percent", nullable=True, min=1, max=99),
    "CheckDataset.split.seed": Key(int, "seed of the split (same seed, same files)", min=0),
    "Arch.backbone": Key(str, "timm model name of the backbone"),
    "Arch.tap": Key(str, "which backbone features the head reads", choices=("features", "head.last_conv",
                                                                          "conv_head")),
    "Arch.num_queries": Key(int, "ML-Decoder queries cap; min(this, classes) are used", min=1),
    "Arch.embed_dim": Key(int, "ML-Decoder width", min=8),
    "Arch.num_layers": Key(int, "ML-Decoder layers", min=1),
    "Arch.num_heads": Key(int, "ML-Decoder attention heads", min=1),
    "Arch.ffn_dim": Key(int, "ML-Decoder feed-forward width", min=1),
    "Arch.dropout": Key(float, "ML-Decoder dropout", min=0.0, max=0.9),
    "Train.num_classes": Key(int, "number of classes; null = read label.txt", nullable=True, min=1),
    "Train.epochs_iters": Key(int, "epochs", min=1),
    "Train.batch_size": Key(int, "batch size per device", min=1),
    "Train.learning_rate": Key(float, "AdamW learning rate", min=0.0, max=1.0),
    "Train.head_learning_rate": Key(float, "the most the ML-Decoder head trains at: min(Train.learning_rate, this)",
                                    min=0.0, max=1.0),
    "Train.pretrain_weight_path": Key(str, f"pretrained weights, {_PATH}", nullable=True),
    "Train.warmup_steps": Key(int, "warm-up epochs (PaddleX's name)", min=0),
    "Train.lr_scheduler": Key(str, "the rate after the warm-up: cosine decay or constant",
                              choices=("cosine", "constant")),
    "Train.resume_path": Key(str, f"checkpoint folder to resume from ({_PATH}), latest, or auto (latest if there "
                             "is one, else start afresh: for retried jobs)", nullable=True),
    "Train.log_interval": Key(int, "log every N steps", min=1),
    "Train.eval_interval": Key(int, "evaluate every N epochs", min=1),
    "Train.save_interval": Key(int, "save every N epochs", min=1),
    "Train.image_size": Key(int, "square input size", min=16, max=4096),
    "Train.loss": Key(str, "loss", choices=("asl", "bce")),
    "Train.augment": Key(str, "training augmentation: ml_decoder, light, or None (resize only)", nullable=True,
                         choices=("ml_decoder", "light")),
    "Train.weight_decay": Key(float, "AdamW weight decay (none on 1-D parameters)", min=0.0, max=1.0),
    "Train.ema_decay": Key(float, "EMA decay of every step (no warm-up); 0 turns EMA off", min=0.0, max=0.99999),
    "Train.precision": Key(str, "autocast: auto (bf16 on GPUs that have it natively, fp16 with a gradient scaler on "
                           "older GPUs, fp32 on CPU), or bf16, fp16, fp32 on any device",
                           choices=("auto", "bf16", "fp16", "fp32")),  # mlcls_ray.precision: keeps torch out
    "Train.channels_last": Key(bool, "channels-last memory format; null = on GPU only", nullable=True),
    "Train.seed": Key(int, "seed of weights and RNG", min=0),
    "Train.num_workers": Key(int, "Ray Train workers; null = from Global.device (gpu:0,1 -> 2)", nullable=True,
                             min=1),
    "Train.cpus_per_worker": Key(float, "CPUs each training worker reserves; null = 1 with a GPU, else half "
                                 "the cluster's CPUs shared by the workers", nullable=True, min=0.01),
    "Train.max_failures": Key(int, "restarts from the latest checkpoint after a worker or node is lost", min=0),
    "Evaluate.weight_path": Key(str, f"model to evaluate, {_PATH}", nullable=True),
    "Evaluate.batch_size": Key(int, "images per inference batch", min=1),
    "Export.weight_path": Key(str, f"model folder to export, {_PATH}; null = <Global.output>/best_model",
                              nullable=True),
    "Export.format": Key(str, "the graph written beside the weights", choices=("onnx", "torchscript")),
    "Predict.batch_size": Key(int, "images per batch", min=1),
    "Predict.model_dir": Key(str, f"model folder, {_PATH}; null = <Global.output>/best_model", nullable=True),
    "Predict.input": Key(str, f"an image, a folder, a list file or a prefix, {_PATH}", nullable=True),
    "Predict.threshold": Key(object, _THRESHOLD, nullable=True, parse=thresholds.parse),
    "Label.model_dir": Key(str, f"model folder, {_PATH}; null = <Global.output>/best_model", nullable=True),
    "Label.input": Key(str, f"a folder or prefix (walked for images; an s3:// prefix is listed by Ray tasks, one "
                       "per sub-prefix), a list file of image URIs, or an S3 Inventory report's manifest.json (CSV "
                       f"or Parquet); {_PATH}", nullable=True),
    "Label.output": Key(str, f"where the Parquet labels go, {_PATH}; null = <Global.output>/labels", nullable=True),
    "Label.batch_size": Key(int, "images per inference batch", min=1),
    "Label.concurrency": Key(int, "inference actors; null = one per GPU (gpu:0,1 is 2; plain gpu every GPU the "
                             "cluster has and gains, which a number caps), 1 on cpu", nullable=True, min=1),
    "Label.threshold": Key(object, _THRESHOLD, nullable=True, parse=thresholds.parse),
    "Label.shard_size": Key(int, "images per input shard: the unit of output files and of resuming", min=1),
    "Label.scores": Key(str, "scores kept per image: all (every class, in class order), top:K (the K highest, with "
                        "their class ids) or none", pattern=r"all|none|top:[1-9]\d*", pattern_help="all, none or "
                        "top:K with K >= 1, e.g. top:5"),
    "Label.scores_dtype": Key(str, "the scores' type; float16 halves their bytes (about 3 significant digits)",
                              choices=("float32", "float16")),
    "Label.review": Key(int, "write review.parquet with the N images the model is least sure about (0 = off); "
                        "the parts gain an uncertainty column and keep at least the top 5 scores", min=0),
    "Serve.model_dir": Key(str, f"model folder, {_PATH}; null = <Global.output>/best_model", nullable=True),
    "Serve.host": Key(str, "address the HTTP proxy binds (0.0.0.0 for every interface)"),
    "Serve.port": Key(int, "HTTP port", min=1, max=65535),
    "Serve.max_batch_size": Key(int, "images batched into one forward pass", min=1),
    "Serve.batch_wait_timeout_s": Key(float, "how long a batch waits to fill after its first image", min=0.0,
                                      max=10.0),
    "Serve.min_replicas": Key(int, "autoscaling floor", min=0),
    "Serve.max_replicas": Key(int, "autoscaling ceiling", min=1),
    "Serve.target_ongoing_requests": Key(float, "requests per replica the autoscaler aims for", min=0.1),
    "Serve.max_image_bytes": Key(int, "largest image a request may carry (after base64) or a URL may return",
                                 min=1),
    "Serve.max_images_per_request": Key(int, "images the batch endpoint takes in one request", min=1),
    "Serve.allow_urls": Key(bool, "let requests name an http(s) URL to fetch (public addresses only)"),
    "Serve.url_timeout_s": Key(float, "deadline of one URL fetch, the lookup and every byte included", min=0.1,
                               max=120.0),
    "Serve.url_ports": Key(object, "ports an image URL may name, e.g. [80, 443]", parse=fetch.parse_ports),
    "Serve.url_allow_networks": Key(object, "networks URLs may reach although they are not public (an internal image "
                                    "store), e.g. [10.20.0.0/16]; [] = public addresses only",
                                    parse=fetch.parse_networks),
    "Serve.fetch_threads": Key(int, "URL fetches one replica runs at once", min=1),
    "Serve.max_request_bytes": Key(int, "largest request body; a larger one is refused (413) before it is read",
                                   min=1),
    "Serve.max_image_pixels": Key(int, "a request's images with more pixels are refused (Serve's own limit)", min=1,
                                  max=MAX_PIXELS_CEILING),
    "Serve.decode_threads": Key(int, "images one replica decodes at once", min=1),
    "Serve.cpus_per_replica": Key(float, "CPUs each replica reserves, and on CPU its torch threads; null = 1 with a "
                                  "GPU, 0.5 on CPU", nullable=True, min=0.01),
    "Serve.request_timeout_s": Key(float, "end-to-end limit of one HTTP request at Serve's proxy (408 after it)",
                                   min=0.1),
    "Serve.auth_token_env": Key(str, "name of the environment variable holding the bearer token requests must "
                                "send; null = no token", nullable=True),
    "Serve.visualize": Key(bool, "return the image with its labels drawn (result.image) when a request does not "
                           "say; PaddleX's default is True"),
    "Audit.folds": Key(int, "folds of the out-of-fold scores: each image is scored by the model trained on the others",
                       min=2, max=20),
    "Audit.scores": Key(str, f"scores to audit instead of training the folds: Parquet with path and scores (one "
                        f"probability per class), a file or a folder, {_PATH}", nullable=True),
    "Audit.apply": Key(str, "a reviewed decisions file (review.html's audit_decisions.csv, or Parquet) whose accepted "
                       f"rows rewrite the dataset's lists, old ones kept as .bak; {_PATH}", nullable=True),
    "Audit.review_limit": Key(int, "issues shown on review.html (the most likely first)", min=1),
    # PaddleX YAMLs say `paddle`; it is accepted so they load unchanged, and means the one engine there is: torch
    "Predict.kernel_option.run_mode": Key(str, "inference engine", choices=("torch", "paddle")),
}

_SGD_SCALE_LR = 0.01  # PaddleX module YAMLs ship 0.05-0.1 with AdamW
# keys of PaddleX's module YAMLs that mean nothing here: a file's are dropped with a warning, so such a YAML loads as is
_PADDLEX_UNUSED = {"Evaluate.log_interval": "evaluation logs no steps"}
_NULLS = ("None", "none", "null", "Null", "NULL", "~", "")


@dataclass
class Config:
    """A resolved config: every schema key with its value, and where the values came from."""

    values: dict[str, Any]
    source: str
    overrides: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def to_yaml(self) -> str:
        nested: dict = {}
        for key, value in self.values.items():
            node = nested
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        header = f"# resolved by mlcls from {self.source}"
        if self.overrides:
            header += "; overrides: " + ", ".join(f"{k}={v!r}" for k, v in self.overrides.items())
        return header + "\n" + yaml.safe_dump(nested, sort_keys=False)


def device_count(device: str) -> int:
    """Devices a ``Global.device`` value names: ``gpu:0,1`` is 2; ``gpu`` and ``cpu`` are 1."""
    return len(device.split(":", 1)[1].split(",")) if ":" in device else 1


def list_presets() -> list[str]:
    """The named presets; any timm backbone is also accepted as ``<timm_name>_ML``."""
    return sorted(p.name[:-5] for p in resources.files("mlcls_ray.configs").iterdir()
                  if p.name.endswith(".yaml") and not p.name.startswith("_"))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or prefix in SCHEMA and SCHEMA[prefix].parse is not None:
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        flat.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return flat


class _TextLoader(yaml.SafeLoader):
    """Keeps every scalar as the text written, so the schema types it: ``output: 0777`` stays ``"0777"``."""


_TextLoader.yaml_implicit_resolvers = {}


def _read_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        tree = yaml.load(text, Loader=_TextLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError([f"{where}{line}: not valid YAML ({getattr(exc, 'problem', exc)})"]) from None
    if not isinstance(tree, dict):
        raise ConfigError([f"{where}: expected a mapping of sections (Global:, CheckDataset:, ...)"])
    return _flatten(tree)


def _unknown_key(key: str) -> str:
    close = difflib.get_close_matches(key, SCHEMA, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known sections: {_sections()}"
    return f"{key}: unknown key{hint}"


def _sections() -> str:
    return ", ".join(dict.fromkeys(k.split(".")[0] for k in SCHEMA))


_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_BOOLS = {"true": True, "false": False}


def _typed(key: str, spec: Key, value: Any) -> Any:
    """Text (from a YAML file or ``-o``) -> the key's type. Numbers are decimal as typed: ``010`` is ten, and
    YAML 1.1's octal, sexagesimal (``1:30``), ``0x10``, ``1_000``, ``nan`` and ``inf`` are refused."""
    if spec.type is str:
        if not isinstance(value, str):
            raise ConfigError([f"{key}: {value!r} is not a string ({spec.help})"])
        return value
    if spec.parse is not None:
        try:
            return spec.parse(value)
        except ValueError as exc:
            raise ConfigError([f"{key}: {exc}"]) from None
    text = value.strip() if isinstance(value, str) else None
    if spec.type is bool and text is not None and text.lower() in _BOOLS:
        return _BOOLS[text.lower()]
    if spec.type is int and text is not None and _INT.fullmatch(text):
        return int(text, 10)
    if spec.type is float and text is not None and _FLOAT.fullmatch(text):
        return float(text)
    kind = {bool: "a boolean; use True or False", int: "a decimal integer", float: "a finite decimal number"}
    hint = "" if spec.type is bool else f" ({spec.help})"
    raise ConfigError([f"{key}: {value!r} is not {kind[spec.type]}{hint}"])


def _coerce(key: str, value: Any) -> Any:
    """Check one value against its key; return it in the key's type or raise ConfigError (one line)."""
    spec = SCHEMA[key]
    if isinstance(value, str) and value.strip() in _NULLS:
        value = None  # `None` in a YAML file is a string to YAML, but PaddleX users mean null
    if value is None:
        if spec.nullable:
            return None
        raise ConfigError([f"{key}: must be set ({spec.help})"])
    value = _typed(key, spec, value)
    if spec.choices is not None and value not in spec.choices:
        allowed = ", ".join(map(str, spec.choices)) + (", or None" if spec.nullable else "")
        raise ConfigError([f"{key}: {value!r} is not allowed; choose one of: {allowed}"])
    if spec.min is not None and value < spec.min or spec.max is not None and value > spec.max:
        bounds = (f"[{spec.min}, {spec.max}]" if spec.min is not None and spec.max is not None
                  else f"(at least {spec.min})" if spec.min is not None else f"(at most {spec.max})")
        raise ConfigError([f"{key}: {value!r} is out of range {bounds} ({spec.help})"])
    if spec.pattern is not None and not re.fullmatch(spec.pattern, value):
        raise ConfigError([f"{key}: {value!r} is not allowed; use {spec.pattern_help}"])
    return value


def parse_override(text: str) -> tuple[str, Any]:
    """``Section.key=value`` -> (key, value text).

    The text is typed by the schema, exactly as a YAML file's values are; ``None``/``null`` mean null everywhere
    and string keys (paths, names) keep the text as typed.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError([f"-o {text!r}: expected Section.key=value, e.g. -o Global.mode=check_dataset"])
    if key not in SCHEMA:
        raise ConfigError([_unknown_key(key)])
    raw = raw.strip()
    return key, None if raw in _NULLS else raw


def _timm_backbones() -> list[str]:
    import timm  # slow to import; only needed for names that are not presets

    return timm.list_models()


def _packaged(name: str) -> dict[str, Any]:
    """The values one YAML under ``mlcls_ray/configs/`` sets, as written."""
    text = resources.files("mlcls_ray.configs").joinpath(f"{name}.yaml").read_text()
    return _read_yaml(text, f"mlcls_ray/configs/{name}.yaml")


def _load_preset(name: str) -> dict[str, Any]:
    """The base's values, then the preset file's (or, for ``<timm model>_ML``, the model and backbone names)."""
    presets = list_presets()
    if name in presets:
        return {**_packaged(_BASE), **_packaged(name)}
    backbones = _timm_backbones()
    if name.endswith("_ML") and name[:-3] in backbones:
        return {**_packaged(_BASE), "Global.model": name, "Arch.backbone": name[:-3]}
    close = difflib.get_close_matches(name, presets + [f"{b}_ML" for b in backbones], n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else f"presets: {', '.join(presets)}"
    raise ConfigError([f"-c {name!r}: not a YAML file, a preset name, or <timm model>_ML; {hint}"])


def _resolve_base(config: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Returns (preset values, values set by the user's YAML file, source description)."""
    is_file = config.endswith((".yaml", ".yml")) or storage.is_remote(config) or Path(config).is_file()
    if not is_file:
        return _load_preset(config), {}, f"preset {config}"
    try:
        user = _read_yaml(storage.read_text(config), config)
    except storage.StorageError as exc:
        raise ConfigError([f"-c {config!r}: {exc}"]) from None
    model = user.get("Global.model")
    if not isinstance(model, str):
        raise ConfigError([f"{config}: Global.model must name a preset ({', '.join(list_presets())})"])
    return _load_preset(model), user, config


def load_config(config: str, overrides: Sequence[str] = (), *, check_paths: bool = True) -> Config:
    """Resolve ``-c CONFIG -o K=V ...`` into a validated :class:`Config`.

    Args:
        config: a preset name or a YAML file (local or s3://). A file only needs the keys it changes, plus
            ``Global.model``, whose preset supplies the rest.
        overrides: ``Section.key=value`` strings, applied after the file.
        check_paths: also check that the paths the mode needs are set and exist.

    Raises:
        ConfigError: listing every problem, one line each.
    """
    base, user, source = _resolve_base(config)
    unused = [k for k in _PADDLEX_UNUSED if k in user]
    for key in unused:
        del user[key]
    problems: list[str] = []
    parsed: dict[str, Any] = {}
    for text in overrides:
        try:
            key, value = parse_override(text)
            parsed[key] = value
        except ConfigError as exc:
            problems.extend(exc.problems)
    values: dict[str, Any] = {}
    for key, value in {**base, **user, **parsed}.items():
        if key not in SCHEMA:
            problems.append(_unknown_key(key) + f" (in {source if key in user else 'the preset'})")
            continue
        try:
            values[key] = _coerce(key, value)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if parsed.get("Global.model", base["Global.model"]) != base["Global.model"]:
        problems.append(f"Global.model: {parsed['Global.model']!r} cannot be set with -o, since the preset decides "
                        f"every default; use -c {parsed['Global.model']}")
    missing = [k for k in SCHEMA if k not in base]
    if missing:
        problems.append(f"preset {base.get('Global.model')}: missing keys {', '.join(missing)}")
    problems += _cross_checks(values, check_paths)
    if problems:
        raise ConfigError(problems)
    ignored = [f"{k}: ignored; a PaddleX key this project has no use for ({_PADDLEX_UNUSED[k]})" for k in unused]
    return Config(values, source, {k: values[k] for k in parsed}, ignored + _warnings(values))


def _warnings(v: dict[str, Any]) -> list[str]:
    """Values that run but are almost surely wrong."""
    lr = v["Train.learning_rate"]
    if lr >= _SGD_SCALE_LR:
        return [f"Train.learning_rate={lr:g} is an SGD-scale rate; with AdamW it makes ML-Decoder predict the same "
                "classes for every image (PaddleClas #3290). The presets use 1e-4 (CLIP 5e-5)"]
    return []


def _cross_checks(v: dict[str, Any], check_paths: bool) -> list[str]:
    """Checks that span keys. Each runs when the keys it reads are valid, so one bad value hides no other problem."""
    def valid(*keys: str) -> bool:
        return all(k in v for k in keys)

    problems = []
    convert = ("CheckDataset.convert.enable", "CheckDataset.convert.src_dataset_type")
    if valid(*convert) and v[convert[0]] and v[convert[1]] is None:
        problems.append("CheckDataset.convert.src_dataset_type: must be set when convert.enable is True; use COCO")
    split = ("CheckDataset.split.enable", "CheckDataset.split.train_percent", "CheckDataset.split.val_percent")
    if valid(*split) and v[split[0]]:
        train, val = v[split[1]], v[split[2]]
        if train is None or val is None or train + val != 100:
            problems.append(
                f"CheckDataset.split.train_percent + val_percent: {train} + {val} must be 100 when split.enable "
                "is True, e.g. -o CheckDataset.split.train_percent=80 -o CheckDataset.split.val_percent=20"
            )
    serve = ("Serve.min_replicas", "Serve.max_replicas")
    if valid(*serve) and v[serve[0]] > v[serve[1]]:
        problems.append(f"Serve.min_replicas={v[serve[0]]} is above Serve.max_replicas={v[serve[1]]}")
    inputs = {"predict": "Predict.input", "label": "Label.input"}
    if valid("Global.mode") and v["Global.mode"] in inputs and valid(inputs[v["Global.mode"]]) \
            and v[inputs[v["Global.mode"]]] is None:
        problems.append(f"{inputs[v['Global.mode']]}: must be set for {v['Global.mode']} ({_PATH})")
    if check_paths and valid("Global.mode", "Global.dataset_dir") and v["Global.mode"] in _DATASET_MODES:
        root = v["Global.dataset_dir"]
        if root is None:
            problems.append(f"Global.dataset_dir: must be set for {v['Global.mode']} ({_PATH})")
        else:
            try:
                if not storage.is_dir(root):
                    problems.append(f"Global.dataset_dir: {root!r} is not an existing folder")
            except storage.StorageError as exc:
                problems.append(f"Global.dataset_dir: {exc}")
    return problems
