"""Benchmark: bulk labeling on Ray Data (``Global.mode=label``) against a plain PyTorch ``DataLoader`` loop.

    python jobs/bench_label.py                        # resnet18_ML at 224 px, 1,000 JPEGs of 640x480, batch 32
    python jobs/bench_label.py --model resnet50_ML --image-size 448 --images 4000 --device gpu

Both sides run the same model folder (random weights saved by this script), the same JPEG files and the same batch
size, end to end from JPEG bytes to written results: read each file, decode it with the one decoder, squish-resize
it, run the model, take the sigmoid, and write one Parquet row per image with every class's score. The baseline is a
``torch.utils.data.DataLoader(num_workers=2)`` over the files feeding the model in the main process (torch on every
core), writing one Parquet file at the end. Ours is ``mlcls -o Global.mode=label`` on an embedded local Ray started
before the clock (actor start-up and model loading are inside the clock on both sides). Each side runs twice,
interleaved; the best run counts, since this VM's speed drifts.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.bench_check import make_jpegs  # noqa: E402
from mlcls_ray import model_dir  # noqa: E402
from mlcls_ray.cli import main as mlcls  # noqa: E402
from mlcls_ray.infer.predictor import Predictor, decode_square  # noqa: E402
from mlcls_ray.models.zoo import ModelSpec, build_model  # noqa: E402


class _Files(Dataset):
    def __init__(self, paths: list[str], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        with open(self.paths[i], "rb") as f:
            return decode_square(f.read(), self.size)


def plain_loop(model: str, paths: list[str], batch_size: int, out: Path, device: str) -> float:
    start = time.perf_counter()
    predictor = Predictor(model, device)
    loader = DataLoader(_Files(paths, predictor.image_size), batch_size=batch_size, num_workers=2)
    scores = [predictor.probabilities(batch.numpy()) for batch in loader]
    probs = np.concatenate(scores)  # [N, C]
    pq.write_table(pa.table({"path": paths, "scores": list(probs)}), out / "plain.parquet")
    return len(paths) / (time.perf_counter() - start)


def ray_label(preset: str, model: str, folder: Path, batch_size: int, out: Path, device: str) -> float:
    start = time.perf_counter()
    settings = ["Global.mode=label", f"Label.model_dir={model}", f"Label.input={folder}", f"Label.output={out}",
                f"Label.batch_size={batch_size}", f"Global.device={device}", f"Global.output={out}"]
    if mlcls(["-c", preset, *[a for s in settings for a in ("-o", s)]]) != 0:
        raise SystemExit("the label run failed")
    return len(list(folder.glob("*.jpg"))) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18_ML")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--workdir", default="bench_data/label")
    args = parser.parse_args()

    work = Path(args.workdir)
    folder = work / "jpegs"
    names = make_jpegs(folder, args.images)
    paths = [str(folder / n) for n in names]
    spec = ModelSpec.create(name=args.model, backbone=args.model[:-3], tap="features", num_classes=80,
                            image_size=args.image_size)
    model = str(work / "model")
    torch.manual_seed(0)
    net, _ = build_model(spec)
    model_dir.save(model, spec, net.state_dict(), [f"class_{i}" for i in range(80)], [0.5] * 80)
    del net
    ray.init(include_dashboard=False, logging_level="ERROR")
    torch_device = "cuda" if args.device == "gpu" else "cpu"
    ours, plain = [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            plain.append(plain_loop(model, paths, args.batch_size, Path(tmp), torch_device))
        out = work / "labels"
        shutil.rmtree(out, ignore_errors=True)
        ours.append(ray_label(args.model, model, folder, args.batch_size, out, args.device))
    print(f"\n{args.model} at {args.image_size} px, {args.images:,} JPEGs 640x480, batch {args.batch_size}, "
          f"{args.device}, best of {args.runs}")
    for name, runs in (("ours   (Ray Data label):       ", ours), ("plain  (DataLoader, 2 workers):", plain)):
        print(f"  {name} {max(runs):8.1f} images/s  (runs: {', '.join(f'{x:.1f}' for x in runs)})")
    print(f"  ratio: {max(ours) / max(plain):.2f}x   (target >= 1.0x)")


if __name__ == "__main__":
    main()
