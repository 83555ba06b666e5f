"""Benchmark: exact validation mAP and calibrated thresholds on 2 gloo workers, class-sharded against rank 0 alone.

    python jobs/bench_metrics.py                                  # 200,000 val images x 10,000 classes
    python jobs/bench_metrics.py --classes 1000 --baseline-classes 1000   # a machine with less memory

Each of 2 processes (gloo on loopback, as training's val exchange) makes its half of the val rows, as
``score_shard`` leaves them: fp32 logits ``[N/2, C]`` and dense uint8 labels, Zipf-like class rates, about 9 labels
an image. Then it runs training's selection on them, ``select_best`` itself (class-sharded: one block of classes a
rank, C numbers gathered; the model saved is a stub), and, on the same rows with ``--baseline-classes`` of the
classes, the path this project had before: every row gathered on rank 0, which computes the mAP and thresholds of
every class alone. The baseline's time and memory grow linearly with C (one sort per class over all N rows; N x C
scores on rank 0), so at fewer classes it is extrapolated to C and the printout says so.

It prints each path's wall time and each worker's CPU seconds (from the rows in memory to the thresholds on rank 0;
on a shared machine the CPU seconds are the fairer clock) and peak RSS, with the rows it held before (the part any
path needs), and checks that both give the same mAP and thresholds.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_GB = 1 << 30


def _rss() -> float:
    """This process's peak resident memory so far, in GB (Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / _GB


def _cpu() -> float:
    """This process's CPU seconds so far: on a busy machine, a fairer clock than the wall's."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _current_rss() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / _GB


def _rows(rank: int, rows: int, classes: int, keep: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """This rank's half of the val rows: fp32 logits leaning to the labels, uint8 labels ~9 an image; only the
    first ``keep`` classes are kept, so a smaller baseline runs on the same numbers without holding them all."""
    n = rows // 2 + (rows % 2 if rank == 0 else 0)
    rng = np.random.default_rng([seed, rank])
    rates = np.minimum(0.5, 9 * (1 / np.arange(1, classes + 1) ** 0.8) / (1 / np.arange(1, classes + 1) ** 0.8).sum())
    logits, labels = np.empty((n, keep), np.float32), np.empty((n, keep), np.uint8)
    for start in range(0, n, 4096):  # a chunk at a time: no float64 [n, C] temporary
        stop = min(n, start + 4096)
        y = rng.random((stop - start, classes), np.float32) < rates
        labels[start:stop] = y[:, :keep]
        logits[start:stop] = (rng.standard_normal((stop - start, classes), np.float32) + 2 * y - 3)[:, :keep]
    return logits, labels


def _worker(rank: int, path: str, port: int, args: argparse.Namespace, out: str) -> None:
    """One of 2 gloo ranks running one path; a process per path, so each peak RSS is that path's own."""
    import torch
    import torch.distributed as dist

    from mlcls_ray import model_dir
    from mlcls_ray.metrics import calibrate_thresholds, mean_average_precision
    from mlcls_ray.models.zoo import ModelSpec
    from mlcls_ray.train.scoring import gather_rows
    from mlcls_ray.train.selection import select_best

    torch.set_num_threads(1)  # one core a worker: the metrics are single-threaded numpy
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(hours=2))
    classes = args.classes if path == "sharded" else args.baseline_classes
    report = {"start": _current_rss()}
    logits, labels = _rows(rank, args.rows, args.classes, classes)
    report["held"] = _current_rss()
    dist.barrier()
    start, cpu = time.perf_counter(), _cpu()
    if path == "sharded":
        spec = ModelSpec.create(name="bench_ML", backbone="test_resnet", tap="features", image_size=32,
                                num_classes=classes, embed_dim=8, num_heads=1, ffn_dim=8)
        config = {"run_name": "bench", "output": out, "label_names": [f"c{c}" for c in range(classes)]}
        best = select_best(config, spec, {"epoch": 1}, [logits], labels, [torch.nn.Linear(1, 1)], None,
                           (lambda line: None) if rank == 0 else None)
        if rank == 0:
            report["map"] = best["score"]
            report["thresholds"] = model_dir.read_info(str(Path(out) / "best_model")).thresholds
    else:
        gathered, truth = gather_rows(logits, None), gather_rows(labels, None)  # rank 0 holds every row
        if rank == 0:
            report["map"] = mean_average_precision(gathered, truth)
            probs = torch.from_numpy(gathered).sigmoid_().numpy()
            report["thresholds"] = [round(float(t), 6) for t in calibrate_thresholds(probs, truth)]
    dist.barrier()
    report["seconds"], report["cpu"], report["peak"] = time.perf_counter() - start, _cpu() - cpu, _rss()
    Path(out, f"{path}{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def _run(path: str, args: argparse.Namespace) -> tuple[dict, dict]:
    import torch.multiprocessing as mp

    from tests.helpers import free_port

    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as out:
        mp.spawn(_worker, args=(path, free_port(), args, out), nprocs=2)
        return tuple(json.loads(Path(out, f"{path}{r}.json").read_text()) for r in (0, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000, help="val images")
    parser.add_argument("--classes", type=int, default=10_000)
    parser.add_argument("--baseline-classes", type=int, default=1_000,
                        help="classes of the rank-0 baseline (extrapolated linearly to --classes)")
    args = parser.parse_args()
    args.baseline_classes = min(args.baseline_classes, args.classes)
    n, c, k = args.rows, args.classes, args.baseline_classes
    sharded, baseline = _run("sharded", args), _run("baseline", args)
    scale = c / k
    print(f"exact val mAP + thresholds, {n:,} images x {c:,} classes, 2 gloo workers; each worker holds its rows "
          f"({sharded[0]['held'] - sharded[0]['start']:.2f} GB) before any metric")
    print(f"{'':46}{'wall':>8}{'CPU rank 0':>12}{'rank 1':>8}{'peak RSS rank 0':>17}{'rank 1':>8}")
    for name, r in ((f"class-sharded (select_best), {c:,} classes", sharded),
                    (f"rank 0 alone (before), {k:,} classes", baseline)):
        print(f"{name:46}{r[0]['seconds']:7.1f}s{r[0]['cpu']:11.1f}s{r[1]['cpu']:7.1f}s"
              f"{r[0]['peak']:16.2f}G{r[1]['peak']:7.2f}G")
    seconds, cpu, peak = baseline[0]["seconds"], baseline[0]["cpu"], baseline[0]["peak"]
    if scale != 1:  # linear in C: one sort per class over every row, and every row's C scores on rank 0
        seconds, cpu, peak = seconds * scale, cpu * scale, baseline[0]["start"] + (peak - baseline[0]["start"]) * scale
        print(f"{f'rank 0 alone, extrapolated x{scale:g} to {c:,}':46}{seconds:7.1f}s{cpu:11.1f}s{'':8}{peak:16.2f}G")
    busiest = max(sharded[0]["cpu"], sharded[1]["cpu"])
    print(f"ratio (before / sharded): wall x{seconds / sharded[0]['seconds']:.2f}, CPU of the busiest rank "
          f"x{cpu / busiest:.2f}, rank 0 peak RSS x{peak / sharded[0]['peak']:.2f}")
    if scale == 1:
        same = sharded[0]["map"] == baseline[0]["map"] and sharded[0]["thresholds"] == baseline[0]["thresholds"]
        print(f"same mAP ({sharded[0]['map']:.6f}) and thresholds on both paths: {same}")
        sys.exit(0 if same else 1)
    print(f"mAP {sharded[0]['map']:.6f}; --baseline-classes {c} checks that both paths agree bit for bit")


if __name__ == "__main__":
    main()
