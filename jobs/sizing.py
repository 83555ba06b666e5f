"""Cluster sizing: what each preset costs, and how many CPU cores, GPUs and hours a job needs.

    python jobs/sizing.py                                  # every preset, 80 classes, the default assumptions
    python jobs/sizing.py --classes 10000 --train-tflops 60 --infer-tflops 150
    python jobs/sizing.py --train-images 10000000 --epochs 20 --label-images 100000000 --hours 8

Measured by this script, on the machine that runs it:
- parameters and the bytes each DDP step all-reduces (fp32 gradients: 4 bytes a parameter), exactly;
- forward FLOPs an image at the preset's size (torch's ``FlopCounterMode``; a training step is about 3x);
- CPU images/s a core: the one decoder plus the squish resize, with and without the ``ml_decoder`` augmentation,
  on 640x480 JPEGs, in one process with one thread.

Assumed, and printed as assumptions: a GPU's achieved TFLOP/s in training and in inference. Measure yours with
``jobs/bench_train.py`` / ``jobs/bench_label.py`` on one GPU and pass ``--train-img-s`` / ``--infer-img-s`` instead.
From them: GPU images/s, CPU cores a GPU needs to stay fed, the ring all-reduce's share of a step at 8 and 64 GPUs
over 100 and 400 Gb/s a GPU (no overlap, the lower bound; DDP overlaps it with the backward pass, so real runs do
better), and the answers to "how long to train" and "how many GPUs to label in a night".
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlcls_ray.config import list_presets, load_config  # noqa: E402
from mlcls_ray.data.images import decode_image  # noqa: E402
from mlcls_ray.data.synthetic import generate  # noqa: E402
from mlcls_ray.data.transforms import TrainAugment  # noqa: E402
from mlcls_ray.models.zoo import build_model  # noqa: E402
from mlcls_ray.train.run import model_spec  # noqa: E402

_LINKS_GBPS = (100, 400)
_WORLDS = (8, 64)


def preset_cost(preset: str, classes: int) -> dict:
    """Parameters, gradient bytes, forward GFLOPs an image, image size and per-GPU batch of one preset."""
    cfg = load_config(preset, check_paths=False)
    spec = model_spec(cfg, classes)
    model, _ = build_model(spec)
    model.eval()
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    x = torch.zeros(1, 3, spec.image_size, spec.image_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return {"preset": preset, "size": spec.image_size, "batch": cfg["Train.batch_size"], "params": params,
            "grad_bytes": 4 * params, "gflops": counter.get_total_flops() / 1e9}


def cpu_rates(size: int, images: int = 200) -> dict[str, float]:
    """Images/s on one core: decode + squish resize, and decode + the ``ml_decoder`` training augmentation, on the
    benchmarks' synthetic JPEGs at 480-640 px a side."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = generate(tmp, 16, min_size=480, max_size=640)
        jpegs = [p.read_bytes() for p in sorted((root / "images").iterdir())]
    rng = np.random.default_rng(0)
    rates = {}
    for name, augment in (("decode+resize", "none"), ("decode+augment", "ml_decoder")):
        transform = TrainAugment(augment, size)
        started = time.perf_counter()
        for i in range(images):
            transform(decode_image(jpegs[i % len(jpegs)]), rng)
        rates[name] = images / (time.perf_counter() - started)
    return rates


def ring_seconds(grad_bytes: int, world: int, gbps: float) -> float:
    """Bandwidth term of a ring all-reduce: each GPU sends and receives 2 (N-1)/N of the buffer."""
    return 2 * (world - 1) / world * grad_bytes * 8 / (gbps * 1e9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="*", default=list_presets())
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--train-tflops", type=float, default=80.0,
                    help="assumed achieved training TFLOP/s a GPU (bf16 PyTorch ResNet-50 on an H100)")
    ap.add_argument("--infer-tflops", type=float, default=100.0, help="assumed achieved bf16 inference TFLOP/s a GPU")
    ap.add_argument("--train-img-s", type=float, help="measured training images/s a GPU (overrides the TFLOP/s)")
    ap.add_argument("--infer-img-s", type=float, help="measured inference images/s a GPU (overrides the TFLOP/s)")
    ap.add_argument("--train-preset", default="ResNet50_ML")
    ap.add_argument("--train-images", type=int, default=10_000_000)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--label-images", type=int, default=100_000_000)
    ap.add_argument("--hours", type=float, default=8.0)
    args = ap.parse_args()

    rates = cpu_rates(448)
    print("CPU, one core of this machine, 480-640 px JPEGs to 448 px: "
          + ", ".join(f"{k} {v:.0f} img/s" for k, v in rates.items()))
    print(f"assumed: training {args.train_tflops:g} TFLOP/s a GPU, inference {args.infer_tflops:g} TFLOP/s a GPU "
          f"(a training step = 3x the forward FLOPs); {args.classes} classes\n")

    head = ("| preset | px | batch/GPU | params | all-reduce/step | GFLOPs/img | train img/s/GPU | cores/GPU (train) "
            "| infer img/s/GPU | cores/GPU (infer) | "
            + " | ".join(f"eff. {n} GPUs @{g} Gb/s" for n in _WORLDS for g in _LINKS_GBPS) + " |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    costs = {}
    for preset in args.presets:
        c = costs[preset] = preset_cost(preset, args.classes)
        train = args.train_img_s or args.train_tflops * 1e3 / (3 * c["gflops"])
        infer = args.infer_img_s or args.infer_tflops * 1e3 / c["gflops"]
        c["train_img_s"], c["infer_img_s"] = train, infer
        step = c["batch"] / train
        effs = [step / (step + ring_seconds(c["grad_bytes"], n, g)) for n in _WORLDS for g in _LINKS_GBPS]
        print(f"| {preset} | {c['size']} | {c['batch']} | {c['params'] / 1e6:.1f}M | {c['grad_bytes'] / 1e6:.0f} MB "
              f"| {c['gflops']:.1f} | {train:,.0f} | {train / rates['decode+augment']:.1f} | {infer:,.0f} "
              f"| {infer / rates['decode+resize']:.1f} | " + " | ".join(f"{e:.0%}" for e in effs) + " |")

    if args.train_preset in costs:
        c = costs[args.train_preset]
        seen = args.train_images * args.epochs
        gpu_hours = seen / c["train_img_s"] / 3600
        step = c["batch"] / c["train_img_s"]
        wall = [f"{n} GPUs {gpu_hours / n * (step + ring_seconds(c['grad_bytes'], n, g)) / step:,.1f} h @{g} Gb/s"
                for n in _WORLDS for g in _LINKS_GBPS]
        print(f"\ntrain {args.train_preset} on {args.train_images:,} images x {args.epochs} epochs = {seen:,} images: "
              f"{gpu_hours:,.0f} GPU-hours of compute; {'; '.join(wall)} (no overlap); with "
              f"{math.ceil(c['train_img_s'] / rates['decode+augment'])} decoding cores a GPU")
        rate = args.label_images / (args.hours * 3600)
        gpus = math.ceil(rate / c["infer_img_s"])
        print(f"label {args.label_images:,} images in {args.hours:g} h with {args.train_preset} = {rate:,.0f} img/s: "
              f"{gpus} GPU(s) and {math.ceil(rate / rates['decode+resize'])} decoding cores (CPU decode), or the GPUs "
              "alone with nvJPEG for baseline JPEGs")


if __name__ == "__main__":
    main()
