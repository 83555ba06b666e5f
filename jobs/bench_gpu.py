"""GPU benchmark, one command: the six presets' training, bulk labeling and a Serve replica on one GPU, each beside a
plain baseline run on the same data, with the ratio.

    python jobs/bench_gpu.py                           # on a GPU machine: every part, about 6-7 minutes (below)
    python jobs/bench_gpu.py --part label,serve        # some parts; --presets ResNet50_ML,PP-LCNet_x1_0_ML
    python jobs/bench_gpu.py --smoke                   # the whole script on CPU with tiny sizes (a test runs it)

On the lent GPU machine (torch and timm, no Ray, no internet; /work/shared/device/make-wheels.sh says why). Build the
wheel folder here once: the --serve set (Ray Train, Data and Serve; this benchmark needs no open_clip) plus the two
pure wheels that set leaves out and this benchmark imports (tensorboardX for training's event files, psutil for
jobs/bench_check). It is about 57 MiB, under the 64 MiB a run carries:

    bash ../shared/device/make-wheels.sh --serve
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl tensorboardX==2.6.5 psutil==7.2.2

Then one `run` with carry [".whl"] and timeout_s 540:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site RAY_USAGE_STATS_ENABLED=0 || exit 1; \\
        python3 jobs/bench_gpu.py --json $OUT/bench_gpu.json

Expected time (estimated from the sizing guide's rates, not yet measured: no GPU was lent to write this): wheels
and start-up 0.5 min, JPEG files 0.2 min, label 1 min, serve 0.5 min, training 35-50 s a preset, so about 6-7 minutes
in all. Parts run in that order (label, serve, train) and a preset is not started when the longest one so far would
end past ``--budget-s`` (420 s), so the run ends before 8 minutes; skipped presets are named, and ``--part train
--presets ...`` runs them in a second call. ``--json`` is rewritten after every figure, so a run cut short still
returns what it measured. With make-wheels.sh's default set (open_clip, no Serve) the serve part is reported as
skipped in one line and ``--part serve`` needs the --serve set.

What each line compares (every figure in images/s; ratio = ours / baseline):

- ``train <preset>``: ``Global.mode=train`` through Ray Train (one GPU worker, the loop's precision: bf16 on H100/
  H200) fed by Ray Data decoding and augmenting the preset's way from JPEG files (``--jpeg-size``, 640x480), at
  ``--size`` px with the preset's batch; two epochs of ``--steps`` steps, and the second one's throughput counts
  (the first is the warm-up: worker start, first pipeline, allocator). The baseline is the bare timm backbone (the
  same one, built the same way, with timm's own pooled linear classifier instead of the ML-Decoder head) training
  in this process on tensors already on the GPU: same batch, bf16 autocast, channels_last, AdamW, ASL, no data, no
  EMA, no Ray; ``--steps`` steps after 10 warm-up steps. Target: ratio >= 0.9.
- ``label``: ``Global.mode=label`` of ``--label-preset`` (ResNet50_ML, random weights) at ``--size`` px from JPEG
  bytes, JPEGs decoded on the GPU (nvJPEG), Parquet out, against a plain PyTorch job: a ``DataLoader`` decoding on
  every core (jobs/bench_label's reader) feeding the same Predictor in this process, one Parquet file at the end.
  Each side labels ``--label-images`` twice (24,000 images, then 4,000); the figure is the extra images over the
  extra seconds, so start-up (actors, model loading, listing) cancels out, and one-time costs fall on the first,
  larger run, so it errs low; the end-to-end rate of the larger run is shown beside it. Target: ours >= 3,000
  images/s on one H100/H200.
- ``serve``: the Serve app (``mlcls_ray.infer.serve``) with one GPU replica, over HTTP on 127.0.0.1, with
  jobs/bench_serve's clients and JPEGs (320x240): 16 concurrent clients against the same 16 clients with
  ``max_batch_size=1`` on the same replica (the baseline without batching); images/s and p50/p99 latency. Target:
  ratio >= 2, as bench_serve.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlcls_ray import model_dir  # noqa: E402
from mlcls_ray.config import Config, list_presets, load_config  # noqa: E402
from mlcls_ray.data.mlcls_format import format_label_file, format_line  # noqa: E402

PARTS = ("label", "serve", "train")  # the order they run in: the single figures first, then preset after preset
_NEEDS = {  # what a part imports; a part whose modules are missing is reported as skipped, with the fix
    "train": ("ray.train", "tensorboardX", "mlcls_ray.train.run", "jobs.bench_check", "jobs.bench_train"),
    "label": ("ray.data", "mlcls_ray.infer.label", "jobs.bench_check", "jobs.bench_label"),
    "serve": ("ray.serve", "fastapi", "mlcls_ray.infer.serve", "jobs.bench_serve"),
}
_CLASSES = 80  # COCO's
_UNIQUE = 64  # distinct JPEGs; the files are copies of them (decoding costs the same, making each would take minutes)
_VAL = 64  # val images of each training run: its one evaluation stays short
_BARE_WARMUP = 10  # steps before the bare backbone's clock
_SERVE_IMAGES = 32
_TRAIN_TARGET, _LABEL_TARGET, _SERVE_TARGET = 0.9, 3000.0, 2.0
_PRECISION = re.compile(r"worker\(s\) on \w+, (\w+)")  # the loop's first line: "[Train] X: 1 worker(s) on cuda, bf16"
# --smoke: the whole script on CPU (timm's test network, a tiny head, 32 px, a few steps and images, one label run a
# side), about two minutes on a 2-core VM, nearly all of it Ray start-ups
_SMOKE = {"presets": "test_resnet_ML", "label_preset": "test_resnet_ML", "size": 32, "steps": 3, "batch": 8,
          "label_images": [24, 24], "label_batch": 8, "serve_requests": 32, "jpeg_size": "64x48",
          "budget_s": 1e9}
_SMOKE_ARCH = ["Arch.embed_dim=64", "Arch.ffn_dim=128", "Arch.num_heads=2"]
_SMOKE_VAL = 8


def _ratio(ours: float, base: float) -> float:
    return ours / base if base > 0 else float("nan")


def _settings(pairs: list[str]) -> list[str]:
    return [a for s in pairs for a in ("-o", s)]


def _mlcls(preset: str, settings: list[str]) -> None:
    from mlcls_ray.cli import main as mlcls

    code = mlcls(["-c", preset, *_settings(settings)])
    if code != 0:
        raise RuntimeError(f"mlcls -c {preset} {' '.join(settings[:2])} ... exited with {code} (its message is above)")


# ---- data ----------------------------------------------------------------------------------------------------------

def _jpegs(root: Path, n: int, size: tuple[int, int]) -> list[str]:
    """``images/000000.jpg``... under ``root``: ``n`` files, copies of bench_check's photo-like JPEGs."""
    from jobs.bench_check import make_jpegs  # psutil, which the GPU machine may lack: imported by the parts that use it

    unique = root / "unique"
    blobs = [(unique / name).read_bytes() for name in make_jpegs(unique, _UNIQUE, size)]
    (root / "images").mkdir(parents=True, exist_ok=True)
    names = [f"images/{i:06d}.jpg" for i in range(n)]
    for i, name in enumerate(names):
        if not (root / name).exists():
            (root / name).write_bytes(blobs[i % len(blobs)])
    return names


def _write_lists(root: Path, names: list[str], val: int) -> None:
    """An MLClsDataset over ``names``: the first ``val`` are val.txt, the rest train.txt; random labels, every image
    with at least one (rows depend only on the index, so every preset sees the same labels)."""
    labels = np.random.default_rng(0).random((len(names), _CLASSES)) < 0.1
    labels[np.arange(len(names)), np.arange(len(names)) % _CLASSES] = True
    (root / "label.txt").write_text(format_label_file([f"class_{i}" for i in range(_CLASSES)]))
    for split, rows in (("val", range(val)), ("train", range(val, len(names)))):
        (root / f"{split}.txt").write_text("".join(format_line(names[i], labels[i]) + "\n" for i in rows))


def _model_folder(folder: Path, preset: str, size: int, arch: list[str]) -> str:
    """A model folder of random weights (bench_serve's ``_save_model``, with Arch overrides and 80 classes)."""
    from mlcls_ray.models.zoo import build_model
    from mlcls_ray.train.run import model_spec

    spec = model_spec(load_config(preset, [f"Train.image_size={size}", *arch], check_paths=False), _CLASSES)
    torch.manual_seed(0)
    net, _ = build_model(spec)
    model_dir.save(str(folder), spec, net.state_dict(), [f"class_{i}" for i in range(_CLASSES)], [0.5] * _CLASSES)
    return str(folder)


def _free_gpu() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ---- train ---------------------------------------------------------------------------------------------------------

def bare_backbone(cfg: Config, batch: int, steps: int, device: str) -> float:
    """Images/s of the preset's bare timm backbone with timm's linear classifier, on random tensors in memory."""
    from timm.optim import create_optimizer_v2

    from mlcls_ray.models.loss import build_loss
    from mlcls_ray.models.zoo import build_model
    from mlcls_ray.train.run import model_spec

    spec = model_spec(cfg, _CLASSES)
    dev = torch.device("cuda" if device == "gpu" else "cpu")
    amp = torch.bfloat16 if dev.type == "cuda" else None  # the bf16; fp32 for the CPU smoke run
    fmt = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
    torch.manual_seed(0)
    model = build_model(spec)[0].backbone  # the backbone ours trains, built the same way (a ViT at this size)
    model.reset_classifier(_CLASSES)  # timm's pooled linear classifier in place of the ML-Decoder head
    model.to(dev, memory_format=fmt).train()
    optimizer = create_optimizer_v2(model, "adamw", lr=cfg["Train.learning_rate"],
                                    weight_decay=cfg["Train.weight_decay"])
    criterion = build_loss(cfg["Train.loss"])
    x = torch.randn(batch, 3, spec.image_size, spec.image_size, device=dev).contiguous(memory_format=fmt)
    y = (torch.rand(batch, _CLASSES, device=dev) < 0.1).float()  # [B, C]

    def step() -> None:
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            logits = model(x)
        loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(_BARE_WARMUP):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()  # the clock starts on an idle device
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    rate = steps * batch / (time.perf_counter() - started)
    del model, optimizer, x, y
    _free_gpu()
    return rate


def ray_train(preset: str, cfg: Config, args: argparse.Namespace, root: Path, work: Path) -> tuple[float, str]:
    """(images/s of the second epoch, the loop's precision) of ``Global.mode=train`` on ``root``."""
    from jobs.bench_train import _EPOCH_IPS

    with tempfile.TemporaryDirectory(dir=work, prefix="train-") as out:
        _mlcls(preset, [
            "Global.mode=train", f"Global.dataset_dir={root}", f"Global.output={out}", f"Global.device={args.device}",
            f"Train.image_size={args.size}", f"Train.batch_size={cfg['Train.batch_size']}", "Train.num_workers=1",
            "Train.epochs_iters=2", "Train.eval_interval=2", "Train.save_interval=2", "Train.warmup_steps=0",
            "Train.pretrain_weight_path=None", f"Train.log_interval={args.steps}",
            *([f"Train.augment={args.augment}"] if args.augment else []), *args.arch])
        log = (Path(out) / "train.log").read_text()
    epochs = {int(e): float(ips) for e, ips in _EPOCH_IPS.findall(log)}
    if 2 not in epochs:
        raise RuntimeError(f"no '[Train][Epoch 2/2][Avg] ... ips: N images/s' line in train.log:\n{log[-2000:]}")
    precision = _PRECISION.search(log)
    return epochs[2], precision.group(1) if precision else "?"


def train_preset(preset: str, args: argparse.Namespace, work: Path) -> dict:
    cfg = load_config(preset, [f"Train.image_size={args.size}", *args.arch,
                               *([f"Train.batch_size={args.batch}"] if args.batch else [])], check_paths=False)
    batch = cfg["Train.batch_size"]
    root = work / f"jpeg_{args.jpeg_size}"
    names = _jpegs(root, args.val + args.steps * batch, args.jpeg)
    _write_lists(root, names, args.val)
    bare = bare_backbone(cfg, batch, args.steps, args.device)
    ours, precision = ray_train(preset, cfg, args, root, work)
    return {"preset": preset, "size": args.size, "batch": batch, "steps": args.steps, "precision": precision,
            "ours": ours, "baseline": bare, "ratio": _ratio(ours, bare), "target": _TRAIN_TARGET}


# ---- label ---------------------------------------------------------------------------------------------------------

def ray_label(preset: str, model: str, uri_list: Path, args: argparse.Namespace, work: Path) -> float:
    """Seconds of one ``Global.mode=label`` run over a list file, into a fresh output."""
    with tempfile.TemporaryDirectory(dir=work, prefix="label-") as out:
        started = time.perf_counter()
        _mlcls(preset, ["Global.mode=label", f"Global.device={args.device}", f"Global.output={out}",
                        f"Label.model_dir={model}", f"Label.input={uri_list}", f"Label.output={out}/labels",
                        *([f"Label.batch_size={args.label_batch}"] if args.label_batch else [])])
        return time.perf_counter() - started


def plain_label(model: str, paths: list[str], batch: int, device: str, work: Path) -> float:
    """Seconds of a plain PyTorch job: a DataLoader decoding on every core feeding the Predictor, one Parquet file.

    jobs/bench_label's ``plain_loop`` with a worker per core: its two workers fit a 2-core VM, not a GPU node."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from torch.utils.data import DataLoader

    from jobs.bench_label import _Files
    from mlcls_ray.infer.predictor import Predictor

    with tempfile.TemporaryDirectory(dir=work, prefix="plain-") as out:
        started = time.perf_counter()
        predictor = Predictor(model, "cuda" if device == "gpu" else "cpu")
        loader = DataLoader(_Files(paths, predictor.image_size), batch_size=batch, num_workers=os.cpu_count() or 1)
        probs = np.concatenate([predictor.probabilities(b.numpy()) for b in loader])  # [N, C]
        pq.write_table(pa.table({"path": paths, "scores": list(probs)}), Path(out) / "plain.parquet")
        seconds = time.perf_counter() - started
    del predictor
    _free_gpu()
    return seconds


def label_part(args: argparse.Namespace, work: Path, model: str) -> dict:
    sizes = sorted(set(args.label_images))  # one size (the smoke run's) is one run a side, timed end to end
    small, large = sizes[0], sizes[-1]
    root = work / f"jpeg_{args.jpeg_size}"
    paths = [str((root / n).resolve()) for n in _jpegs(root, large, args.jpeg)]
    lists = {}
    for n in sizes:
        lists[n] = work / f"label_{n}.txt"
        lists[n].write_text("".join(p + "\n" for p in paths[:n]))
    batch = args.label_batch or load_config(args.label_preset, [], check_paths=False)["Label.batch_size"]
    # the larger run first: one-time costs (first task workers, CUDA start-up) fall on it, so the figure errs low
    ours = {n: ray_label(args.label_preset, model, lists[n], args, work) for n in reversed(sizes)}
    baseline_error = None
    try:
        plain = {n: plain_label(model, paths[:n], batch, args.device, work) for n in reversed(sizes)}
    except Exception as exc:  # noqa: BLE001 - e.g. a /dev/shm too small for the DataLoader's workers: keep ours
        plain, baseline_error = {n: float("nan") for n in sizes}, f"{type(exc).__name__}: {exc}"

    def marginal(seconds: dict[int, float]) -> float:  # start-up cancels; a noisy pair falls back to end to end
        extra = seconds[large] - seconds[small]
        return (large - small) / extra if extra > 0 else large / seconds[large]

    return {"preset": args.label_preset, "size": args.size, "batch": batch, "images": [small, large],
            "ours": marginal(ours), "ours_end_to_end": large / ours[large], "baseline": marginal(plain),
            "baseline_end_to_end": large / plain[large], "ratio": _ratio(marginal(ours), marginal(plain)),
            "target": _LABEL_TARGET, "decode": "device (nvJPEG)" if args.device == "gpu" else "CPU",
            "baseline_workers": os.cpu_count(), "baseline_error": baseline_error}


# ---- serve ---------------------------------------------------------------------------------------------------------

def serve_part(args: argparse.Namespace, model: str) -> dict:
    from ray import serve

    from jobs.bench_serve import _app, _images, _run
    from mlcls_ray.infer import serve as srv
    from mlcls_ray.infer.serve_settings import ServeSettings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = ServeSettings.from_args({"model_dir": model, "device": args.device,
                                        "batch_wait_timeout_s": args.serve_wait})
    url, images, runs = f"http://127.0.0.1:{port}{srv.ROUTE}", _images(_SERVE_IMAGES), {}
    try:
        for name, batch in (("baseline", 1), ("ours", settings.max_batch_size)):  # only user_config differs
            handle = serve.run(_app(settings, batch), name="bench_gpu", route_prefix="/")
            _run(url, images, 4, 48)  # warm-up: threads, allocator, first batches at this setting
            seen = len(handle.stats.remote().result()["batch_sizes"])
            runs[name] = _run(url, images, 16, args.serve_requests)
            sizes = handle.stats.remote().result()["batch_sizes"][seen:]
    finally:
        serve.shutdown()
    ours, base = runs["ours"], runs["baseline"]
    return {"preset": args.label_preset, "size": args.size, "wait_s": args.serve_wait, "ours": ours["rps"],
            "ours_p50_ms": ours["p50"], "ours_p99_ms": ours["p99"], "mean_batch": float(np.mean(sizes)),
            "baseline": base["rps"], "baseline_p50_ms": base["p50"], "baseline_p99_ms": base["p99"],
            "ratio": _ratio(ours["rps"], base["rps"]), "target": _SERVE_TARGET}


# ---- report --------------------------------------------------------------------------------------------------------

def _line(kind: str, name: str, r: dict) -> str:
    if kind == "train":
        return (f"train {name} {r['size']}px batch {r['batch']} {r['precision']}: ours {r['ours']:.1f} img/s "
                f"(Ray Train + Ray Data from JPEGs) | bare timm backbone {r['baseline']:.1f} img/s (in-memory tensors) "
                f"| ratio {r['ratio']:.2f}x (target >= {r['target']})")
    if kind == "label":
        met = "met" if r["ours"] >= r["target"] else "missed"
        plain = (f"FAILED: {r['baseline_error']}" if r["baseline_error"] else
                 f"{r['baseline']:.1f} img/s (end to end {r['baseline_end_to_end']:.1f})")
        return (f"label {r['preset']} {r['size']}px batch {r['batch']}: ours {r['ours']:.1f} img/s (Ray Data, "
                f"{r['decode']} decode; end to end {r['ours_end_to_end']:.1f}) | plain DataLoader "
                f"({r['baseline_workers']} workers, CPU decode) {plain} | ratio {r['ratio']:.2f}x (target ours >= "
                f"{r['target']:,.0f} img/s: {met}; {r['images'][1]:,} then {r['images'][0]:,} images)")
    return (f"serve {r['preset']} {r['size']}px wait {r['wait_s']}s: ours {r['ours']:.1f} img/s, p50 "
            f"{r['ours_p50_ms']:.1f} ms, p99 {r['ours_p99_ms']:.1f} ms (16 clients, mean batch {r['mean_batch']:.1f}) "
            f"| baseline {r['baseline']:.1f} img/s, p50 {r['baseline_p50_ms']:.1f} ms, p99 "
            f"{r['baseline_p99_ms']:.1f} ms (16 clients, max batch 1) | ratio {r['ratio']:.2f}x "
            f"(target >= {r['target']}x)")


def _summary(results: dict) -> list[str]:
    lines = [results["header"]]
    for kind in ("train", "label", "serve"):
        for name, r in results[kind].items():
            lines.append(_line(kind, name, r))
        for name, why in results["skipped"].items():
            if name.split(" ")[0] == kind:
                lines.append(f"{name}: skipped: {why}")
        for name, why in results["failed"].items():
            if name.split(" ")[0] == kind:
                lines.append(f"{name}: FAILED: {why}")
    lines.append(f"done in {results['seconds']:.0f} s")
    return lines


def _missing(part: str) -> str | None:
    """Why ``part`` cannot run on this machine (a package it needs is not installed), or None."""
    for module in _NEEDS[part]:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            if not isinstance(exc, ModuleNotFoundError) or (exc.name or "").split(".")[0] in ("mlcls_ray", "jobs"):
                return None  # our own code is broken, not the machine: the part runs and fails, naming the error
            hint = ("make-wheels.sh --serve builds the Serve wheels" if part == "serve"
                    else "put the missing wheel in .whl (pip download, as for tensorboardX and psutil)")
            return f"{module} cannot be imported ({exc}); {hint}: see the top of jobs/bench_gpu.py"
    return None


def _header(args: argparse.Namespace) -> str:
    import ray

    if torch.cuda.is_available():
        device = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    else:
        device = "CPU only (no CUDA device)"
    return (f"bench_gpu: {device}; {os.cpu_count()} CPUs; torch {torch.__version__}, ray {ray.__version__}; "
            f"{'smoke run, ' if args.smoke else ''}device={args.device}, JPEGs {args.jpeg_size}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="all", help=f"all, or a comma list of {', '.join(PARTS)}")
    p.add_argument("--presets", default=",".join(list_presets()), help="comma list of presets to train")
    p.add_argument("--size", type=int, default=448, help="px, every part")
    p.add_argument("--steps", type=int, default=80, help="timed training steps per preset (and as many warm-up)")
    p.add_argument("--batch", type=int, default=None, help="training batch of every preset (default: the preset's)")
    p.add_argument("--augment", default=None, help="Train.augment (default: the preset's, ml_decoder)")
    p.add_argument("--label-preset", default="ResNet50_ML", help="the model of the label and serve parts")
    p.add_argument("--label-images", type=int, nargs=2, default=[4000, 24000], metavar=("SMALL", "LARGE"),
                   help="images of the two label runs of each side; the figure is their difference over the time's")
    p.add_argument("--label-batch", type=int, default=None, help="Label.batch_size (default: the preset's)")
    p.add_argument("--serve-requests", type=int, default=800, help="requests of each run of the 16 clients")
    p.add_argument("--serve-wait", type=float, default=0.01, help="Serve.batch_wait_timeout_s (cluster/serve.yaml's)")
    p.add_argument("--jpeg-size", default="640x480", help="WxH of the JPEG files")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="start no preset that the longest one so far would end past this many seconds")
    p.add_argument("--workdir", default="bench_data/gpu", help="JPEGs, model folder and run outputs go here")
    p.add_argument("--json", default=None, help="write the results here, after every figure")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes (flags given win): what the test runs")
    return p


def main(argv: list[str] | None = None) -> dict:
    """Run the parts; print each figure as it comes and a summary at the end; return the results."""
    import ray

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    if "--smoke" in argv:
        parser.set_defaults(**_SMOKE)  # flags given still win
    args = parser.parse_args(argv)
    args.device = "gpu" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.device == "cpu" and not args.smoke:
        raise SystemExit("bench_gpu: no CUDA device here; --smoke runs the script on CPU with tiny sizes")
    args.arch = _SMOKE_ARCH if args.smoke else []
    args.val = _SMOKE_VAL if args.smoke else _VAL
    args.jpeg = tuple(int(v) for v in args.jpeg_size.lower().split("x"))
    parts = PARTS if args.part == "all" else tuple(p for p in PARTS if p in args.part.split(","))
    unknown = set(args.part.split(",")) - set(PARTS) - {"all"}
    if unknown or not parts:
        raise SystemExit(f"bench_gpu: --part {args.part}: use all or a comma list of {', '.join(PARTS)}")
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    results = {"header": _header(args), "settings": {k: v for k, v in vars(args).items() if k != "jpeg"},
               "train": {}, "label": {}, "serve": {}, "skipped": {}, "failed": {}, "seconds": 0.0}
    print(results["header"], flush=True)

    def record(kind: str, name: str, run) -> float:
        """Run one item; keep its figures, or why it failed; rewrite --json. Returns its seconds."""
        t0 = time.monotonic()
        try:
            results[kind][name] = {**run(), "seconds": round(time.monotonic() - t0, 1)}
            print(_line(kind, name, results[kind][name]), flush=True)
        except Exception as exc:  # noqa: BLE001 - one failed figure must not cost the others of a scarce GPU run
            results["failed"][f"{kind} {name}"] = f"{type(exc).__name__}: {exc}"
            print(f"{kind} {name}: FAILED: {type(exc).__name__}: {exc}", flush=True)
        save()
        return time.monotonic() - t0

    def skip(name: str, why: str) -> None:
        results["skipped"][name] = why
        print(f"{name}: skipped: {why}", flush=True)
        save()

    def save() -> None:
        results["seconds"] = time.monotonic() - started
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")

    own_ray = not ray.is_initialized()
    if own_ray:  # with the dashboard: Ray Train's state API needs it
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", logging_level="ERROR")
    models: dict[str, str] = {}

    def model() -> str:  # label and serve share one model folder, made by whichever runs first
        if not models:
            models["dir"] = _model_folder(work / f"model_{args.label_preset}_{args.size}", args.label_preset,
                                          args.size, args.arch)
        return models["dir"]

    try:
        for part in parts:
            why = _missing(part)
            if why is not None:
                skip(part, why)
                continue
            if part == "label":
                record("label", args.label_preset, lambda: label_part(args, work, model()))
            elif part == "serve":
                record("serve", args.label_preset, lambda: serve_part(args, model()))
            else:
                longest = 0.0
                for preset in args.presets.split(","):
                    if time.monotonic() - started + longest > args.budget_s:
                        skip(f"train {preset}", f"--budget-s {args.budget_s:.0f} would be passed; run it with "
                                                f"--part train --presets {preset}")
                        continue
                    longest = max(longest, record("train", preset, lambda p=preset: train_preset(p, args, work)))
    finally:
        if own_ray:
            ray.shutdown()
    save()
    print("\n" + "\n".join(_summary(results)), flush=True)
    return results


if __name__ == "__main__":
    raise SystemExit(1 if main()["failed"] else 0)
