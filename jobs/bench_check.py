"""Benchmark: the check pipeline's full decode (Ray Data) against two plain baselines on the same files.

    python jobs/bench_check.py                 # decode rate on 4,000 JPEGs: ours, a single-process PIL loop,
                                               # a same-size multiprocessing.Pool, and the ratios
    python jobs/bench_check.py --memory 20000  # plus peak RSS of a whole check_dataset run on 20k images

The pool runs the very same per-image work as our tasks (read the file, then the one decoder), so ours / pool is
what Ray adds or costs; the PIL loop is the plain single-process baseline. Ray's workers and the pool's processes
start before the clock, as on a long-lived cluster; Ray Data's planning and task scheduling are inside it. Each
side is the best of --repeats interleaved runs over a warm page cache.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import ray
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlcls_ray.data.images import decode_image  # noqa: E402
from mlcls_ray.data.manifest import Manifest  # noqa: E402
from mlcls_ray.data.pipeline import read_images  # noqa: E402


def make_jpegs(folder: Path, n: int, size: tuple[int, int] = (640, 480)) -> list[str]:
    """n photo-sized JPEGs (smooth gradients plus noise, so they compress like photos), made once."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = [f"{i:05d}.jpg" for i in range(n)]
    if all((folder / name).exists() for name in names):
        return names
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for name in names:
        c = rng.uniform(0, 255, (2, 3))
        base = c[0] + (c[1] - c[0]) * ((xx + yy) / (w + h))[..., None]  # [H, W, 3]
        img = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / name, quality=90)
    return names


def plain_loop(folder: Path, names: list[str]) -> float:
    start = time.perf_counter()
    for name in names:
        with Image.open(folder / name) as img:
            np.asarray(img.convert("RGB"))
    return time.perf_counter() - start


def _read_and_decode(path: str) -> tuple[int, int]:
    with open(path, "rb") as f:
        return decode_image(f.read()).shape[:2]


def process_pool(pool: multiprocessing.pool.Pool, folder: Path, names: list[str]) -> float:
    paths = [str(folder / name) for name in names]
    start = time.perf_counter()
    sizes = pool.map(_read_and_decode, paths, chunksize=max(1, len(paths) // (4 * pool._processes)))
    elapsed = time.perf_counter() - start
    assert len(sizes) == len(paths)
    return elapsed


def ray_pipeline(folder: Path, names: list[str]) -> float:
    import pyarrow as pa

    manifest = Manifest.concat(("bench",), 1, [(0, pa.array(names), np.arange(1, len(names) + 1),
                                                np.zeros((len(names), 1), np.uint8))])
    start = time.perf_counter()
    bad = 0
    for batch in read_images(manifest, str(folder), image="none").iter_batches(batch_size=None, batch_format="numpy"):
        bad += int((batch["error_kind"] != "").sum())
    elapsed = time.perf_counter() - start
    assert bad == 0, f"{bad} images failed to decode"
    return elapsed


class PeakMemory:
    """Samples this process and all its descendants (Ray's raylet, GCS and workers) every 0.2 s.

    ``peak_rss`` sums RSS (shared pages counted once per process); ``peak_pss`` sums PSS (shared pages split
    between the processes that map them), which is what the tree really occupies.
    """

    def __init__(self):
        self.peak_rss = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            rss = pss = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    info = p.memory_full_info()
                except psutil.Error:
                    continue
                rss, pss = rss + info.rss, pss + info.pss
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def memory_run(workdir: Path, num_images: int) -> None:
    from mlcls_ray.cli import main as mlcls_main
    from mlcls_ray.data.synthetic import generate

    data = workdir / f"synthetic_{num_images}"
    if not (data / "label.txt").exists():
        generate(data, num_images)
    start = time.perf_counter()
    with PeakMemory() as mem:
        code = mlcls_main(["-c", "PP-LCNet_x1_0_ML", "-o", f"Global.dataset_dir={data}",
                           "-o", f"Global.output={workdir / 'check_output'}"])
    elapsed = time.perf_counter() - start
    driver_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"check_dataset on {num_images:,} images (64-128 px): exit {code}, {elapsed:.1f} s "
          f"({num_images / elapsed:,.0f} img/s, report and plots included)")
    print(f"peak memory: driver RSS {driver_mb:,.0f} MB; driver + all Ray processes: PSS {mem.peak_pss / 2**20:,.0f} MB"
          f" (RSS summed, shared pages counted per process: {mem.peak_rss / 2**20:,.0f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--workdir", type=Path, default=Path("bench_data"))
    parser.add_argument("--repeats", type=int, default=3, help="best of N interleaved runs for each side")
    parser.add_argument("--memory", type=int, default=0, metavar="N", help="also run check_dataset on N images")
    args = parser.parse_args()

    folder = args.workdir / "jpegs"
    names = make_jpegs(folder, args.images)
    cpus = os.cpu_count()
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR")
    ray_pipeline(folder, names)  # starts every worker process, as on a running cluster, and warms the page cache
    with multiprocessing.get_context("spawn").Pool(cpus) as pool:
        process_pool(pool, folder, names)  # the pool's processes start and import the decoder before the clock
        # interleaved, so a change in the machine's speed (a shared VM's neighbours) hits every side alike
        runs = [(plain_loop(folder, names), process_pool(pool, folder, names), ray_pipeline(folder, names))
                for _ in range(args.repeats)]
        base, pooled, ours = (min(side) for side in zip(*runs))
    n = len(names)
    print(f"machine: {cpus} CPUs; {n:,} JPEGs 640x480")
    print(f"plain single-process PIL loop:        {n / base:8.1f} img/s ({base:.2f} s)")
    print(f"multiprocessing.Pool({cpus}), same work: {n / pooled:8.1f} img/s ({pooled:.2f} s)")
    print(f"check pipeline (Ray Data):            {n / ours:8.1f} img/s ({ours:.2f} s)")
    print(f"ratio to the single-process loop: {base / ours:.2f}x")
    print(f"ratio to the process pool:        {pooled / ours:.2f}x ({100 * pooled / ours:.0f}% of the pool's rate)")
    if args.memory:
        memory_run(args.workdir, args.memory)


if __name__ == "__main__":
    main()
