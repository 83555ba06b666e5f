"""Benchmark: does the ML-Decoder recipe learn as well as a plain timm loop on the same data?

    python jobs/bench_accuracy.py                                  # digits grid and shapes, LR sweep, all methods
    python jobs/bench_accuracy.py --sets digits --lrs 2e-3 --methods timm,recipe
    python jobs/bench_accuracy.py --sets digits --lrs 2e-3 --model hgnetv2_b0_ML -o Arch.tap=head.last_conv

For each data set and learning rate it trains, from scratch, with the same epochs, global batch, images and size:

- ``timm``: a plain single-process loop over the backbone with timm's own head (global pool + linear), BCE, AdamW
  at a constant rate, no augmentation: the baseline anyone would write first;
- ``recipe``: the project's model, loss, optimiser and schedule (ML-Decoder head at its own rate, ASL, the config's
  ``Train.lr_scheduler``) in the same kind of loop, without Ray (:func:`mlcls_ray.train.baseline.plain_train`);
- ``mlcls-1`` / ``mlcls-2``: ``mlcls -c <model> -o Global.mode=train`` through Ray Train on 1 and 2 CPU workers.

and prints val mAP and wall time in one table, with each row's gap to the timm loop at the same rate. The swept
rate is the backbone's (``Train.learning_rate``); the head keeps the recipe's ``Train.head_learning_rate``. The data
sets: ``digits`` (scikit-learn's digits on a 2 x 2 grid, 10 classes, :mod:`mlcls_ray.data.digits`) and ``shapes``
(the former demo set, :mod:`mlcls_ray.data.synthetic`: small shapes on noisy backgrounds). Every other setting is
the recipe's default, except those the table shares (epochs, batch, size, no pretrained weights, no augmentation,
no EMA).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlcls_ray import model_dir  # noqa: E402
from mlcls_ray.cli import main as mlcls  # noqa: E402
from mlcls_ray.config import load_config  # noqa: E402
from mlcls_ray.data.digits import generate_digits  # noqa: E402
from mlcls_ray.data.images import decode_image  # noqa: E402
from mlcls_ray.data.manifest import Manifest  # noqa: E402
from mlcls_ray.data.mlcls_format import read_splits  # noqa: E402
from mlcls_ray.data.problems import ProblemLog  # noqa: E402
from mlcls_ray.data.synthetic import generate  # noqa: E402
from mlcls_ray.data.transforms import ModelInput, resize_square  # noqa: E402
from mlcls_ray.metrics import mean_average_precision  # noqa: E402
from mlcls_ray.train.baseline import plain_train  # noqa: E402
from mlcls_ray.train.run import model_spec  # noqa: E402

METHODS = ("timm", "recipe", "mlcls-1", "mlcls-2")


def build_set(name: str, root: Path) -> Path:
    if (root / "train.txt").exists():
        return root
    if name == "digits":
        return generate_digits(root, 1200, 400, size=64)
    return generate(root, 3000, min_size=64, max_size=128)  # the former demo set


def _splits(root: Path) -> tuple[list[str], Manifest, Manifest]:
    with ProblemLog() as problems:
        return read_splits(str(root), problems)


def _images(root: Path, manifest: Manifest, size: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([resize_square(decode_image((root / p).read_bytes()), size)
                                      for p in manifest.paths.to_pylist()]))  # [N, S, S, 3] uint8


def timm_loop(backbone: str, root: Path, epochs: int, batch: int, lr: float, size: int, seed: int = 0) -> float:
    """The plain baseline: timm's model with its own linear head, BCE, AdamW at a constant rate; val mAP."""
    names, train, val = _splits(root)
    torch.manual_seed(seed)
    model = timm.create_model(backbone, num_classes=len(names))
    cfg = model.pretrained_cfg
    to_input = ModelInput(cfg["mean"], cfg["std"])
    x_train, y_train = _images(root, train, size), torch.from_numpy(train.labels(np.arange(len(train)))).float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        model.train()
        for idx in np.array_split(rng.permutation(len(train)), int(np.ceil(len(train) / batch))):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(to_input(x_train[idx])), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(to_input(chunk)) for chunk in _images(root, val, size).split(64)])
    return mean_average_precision(logits.numpy(), val.labels(np.arange(len(val))))


def recipe_loop(model: str, root: Path, epochs: int, batch: int, lr: float, size: int, opts: list[str]) -> float:
    cfg = load_config(model, [*opts, f"Train.image_size={size}"], check_paths=False)
    names, train, val = _splits(root)
    return plain_train(model_spec(cfg, len(names)), str(root), train, val, epochs=epochs, batch_size=batch, lr=lr,
                       head_lr=cfg["Train.head_learning_rate"], warmup_epochs=cfg["Train.warmup_steps"],
                       lr_scheduler=cfg["Train.lr_scheduler"],
                       weight_decay=cfg["Train.weight_decay"], loss=cfg["Train.loss"], threads=os.cpu_count())["map"]


def mlcls_run(model: str, root: Path, epochs: int, batch: int, lr: float, size: int, opts: list[str],
              workers: int) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-accuracy-") as out:
        settings = [f"Global.dataset_dir={root}", f"Global.output={out}", "Global.mode=train", "Global.device=cpu",
                    f"Train.image_size={size}", f"Train.batch_size={batch // workers}", f"Train.num_workers={workers}",
                    f"Train.epochs_iters={epochs}", f"Train.learning_rate={lr}", "Train.pretrain_weight_path=None",
                    "Train.augment=None", "Train.ema_decay=0", f"Train.save_interval={epochs}",
                    "Train.log_interval=1000", *opts]
        if mlcls(["-c", model, *[a for s in settings for a in ("-o", s)]]) != 0:
            raise SystemExit("the Ray Train run failed")
        return float(model_dir.read_info(str(Path(out) / "best_model")).extra["score"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18_ML", help="a preset or <timm model>_ML")
    parser.add_argument("--sets", default="digits,shapes")
    parser.add_argument("--lrs", default="1e-4,5e-4,1e-3,2e-3")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--data", default="bench_data")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a config setting for recipe and mlcls, e.g. a preset with the from-scratch schedule: "
                             "-o Train.lr_scheduler=constant -o Train.warmup_steps=0")
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    backbone = load_config(args.model, [], check_paths=False)["Arch.backbone"]
    if any(m.startswith("mlcls") for m in methods):
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", logging_level="ERROR")
    rows = []
    for name in args.sets.split(","):
        root = build_set(name, Path(args.data) / f"accuracy_{name}")
        for lr in (float(v) for v in args.lrs.split(",")):
            base = None
            for method in methods:
                started = time.perf_counter()
                common = (root, args.epochs, args.batch_size, lr, args.image_size)
                if method == "timm":
                    value = timm_loop(backbone, *common)
                elif method == "recipe":
                    value = recipe_loop(args.model, *common, args.override)
                else:
                    value = mlcls_run(args.model, *common, args.override, workers=int(method[-1]))
                base = value if method == "timm" else base
                rows.append((name, lr, method, value, time.perf_counter() - started, base))
                print(f"{name} lr {lr:g} {method}: mAP {value:.3f} in {rows[-1][4]:.0f} s", flush=True)
    settings = " ".join(f"-o {o}" for o in args.override)
    print(f"\n{args.model} ({backbone}) {settings} from scratch, {args.epochs} epochs, "
          f"global batch {args.batch_size}, {args.image_size} px, {os.cpu_count()} CPUs")
    print(f"{'set':8} {'lr':>7} {'method':9} {'val mAP':>8} {'vs timm':>8} {'wall s':>7}")
    for name, lr, method, value, seconds, base in rows:
        gap = f"{value - base:+.3f}" if base is not None and method != "timm" else ""
        print(f"{name:8} {lr:7.0e} {method:9} {value:8.3f} {gap:>8} {seconds:7.0f}")


if __name__ == "__main__":
    main()
