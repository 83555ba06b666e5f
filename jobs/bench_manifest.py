"""Benchmark: the driver's side of check_dataset at scale, on generated lists (no image files needed).

    python jobs/bench_manifest.py          # 10M lines x 80 classes, 1M lines x 1,000, 10M Parquet rows x 11,166
    python jobs/bench_manifest.py --scale 1000000:80 --scale 2000000:20000:parquet   # any LINES:CLASSES[:parquet]

For each scale it writes ``label.txt`` and the train and val lists (80/20, Zipf-like class rates, 3% unlabelled
images, paths in random order): text lists of 0/1, or with ``:parquet`` Parquet lists of class ids, about 9 an image
(Tencent ML-Images' 11,166 classes by default). Then, in a fresh process so the peak belongs to this work alone: it
parses both lists into the columnar manifest, finds duplicates, computes the report's statistics (per-class counts
per split, label cardinality, train/val drift, the co-occurrence heatmap and top pairs) and re-splits the lists 80/20
with iterative stratification, writing them. It prints the time of each step and the driver's peak RSS.

The baseline of the text lists is the per-line parser this project had before: one Python object per line, 1.1 KB
at 80 classes (about 11 GB and 20 minutes for 10M lines, by the issue's measurement). ``--baseline N`` times it on the
first N lines of the 80-class lists and extrapolates, so the comparison runs on the same data without exhausting the
machine. The baseline of the Parquet lists is the bit-packed label matrix the manifest held before labels became
sets: C/8 bytes a row, 13 GB at 10M x 11,166 (computed, not run: it would not fit here beside the rest).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def generate(root: Path, lines: int, classes: int, seed: int = 0) -> None:
    """Lists of ``images/<8 digits>.jpg<TAB>0,1,...`` in 100k-line chunks, 80% train, 20% val, in random order."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "label.txt").write_text("".join(f"{i} class_{i}\n" for i in range(classes)))
    rng = np.random.default_rng(seed)
    rates = 0.3 / np.arange(1, classes + 1) ** 0.8  # Zipf-like: the first class on 30% of images
    width = 2 * classes - 1
    n_train = lines * 8 // 10
    order = rng.permutation(lines)  # lines in no particular order, the hard case for sorting paths
    with open(root / "train.txt", "wb") as train, open(root / "val.txt", "wb") as val:
        for start in range(0, lines, 100_000):
            ids = order[start:start + 100_000]
            n = len(ids)
            digits = (ids[:, None] // 10 ** np.arange(7, -1, -1)) % 10 + ord("0")  # [n, 8]
            labels = rng.random((n, classes)) < rates  # [n, C]
            labels[rng.random(n) < 0.03] = False
            row = np.empty((n, 7 + 8 + 5 + width + 1), np.uint8)
            row[:, :7] = np.frombuffer(b"images/", np.uint8)
            row[:, 7:15] = digits
            row[:, 15:20] = np.frombuffer(b".jpg\t", np.uint8)
            row[:, 20:20 + width] = ord(",")
            row[:, 20:20 + width:2] = labels + ord("0")
            row[:, -1] = ord("\n")
            cut = int(np.clip(n_train - start, 0, n))
            train.write(row[:cut].tobytes())
            val.write(row[cut:].tobytes())


def _paths(ids: np.ndarray) -> pa.Array:
    """``images/<8 digits>.jpg`` of each id, built as one buffer."""
    digits = (ids[:, None] // 10 ** np.arange(7, -1, -1)) % 10 + ord("0")  # [n, 8]
    text = np.empty((len(ids), 19), np.uint8)
    text[:, :7] = np.frombuffer(b"images/", np.uint8)
    text[:, 7:15] = digits
    text[:, 15:] = np.frombuffer(b".jpg", np.uint8)
    offsets = np.arange(0, 19 * (len(ids) + 1), 19, dtype=np.int32)
    return pa.StringArray.from_buffers(len(ids), pa.py_buffer(offsets), pa.py_buffer(text.tobytes()))


def generate_parquet(root: Path, lines: int, classes: int, seed: int = 0, labels_per_image: float = 9.0) -> None:
    """``train.parquet`` and ``val.parquet`` (80/20) of ``path`` and ``labels``: a Poisson number of class ids an
    image, drawn with Zipf rates (the first class on about a third of the images), 3% of images unlabelled."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in ("train.txt", "val.txt"):
        (root / stale).unlink(missing_ok=True)
    (root / "label.txt").write_text("".join(f"{i} class_{i}\n" for i in range(classes)))
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(1 / np.arange(1, classes + 1) ** 0.8)
    cdf /= cdf[-1]
    n_train = lines * 8 // 10
    order = rng.permutation(lines)
    schema = pa.schema([("path", pa.string()), ("labels", pa.list_(pa.int32()))])
    with pq.ParquetWriter(root / "train.parquet", schema, compression="zstd") as train, \
            pq.ParquetWriter(root / "val.parquet", schema, compression="zstd") as val:
        for start in range(0, lines, 1_000_000):
            n = min(1_000_000, lines - start)
            k = rng.poisson(labels_per_image, n)
            k[rng.random(n) < 0.03] = 0
            row = np.repeat(np.arange(n), k)
            ids = np.minimum(np.searchsorted(cdf, rng.random(len(row))), classes - 1).astype(np.int32)
            sort = np.lexsort((ids, row))
            row, ids = row[sort], ids[sort]
            first = np.ones(len(ids), bool)
            first[1:] = (ids[1:] != ids[:-1]) | (row[1:] != row[:-1])  # a class drawn twice counts once
            offsets = np.zeros(n + 1, np.int32)
            np.cumsum(np.bincount(row[first], minlength=n), out=offsets[1:])
            table = pa.table({"path": _paths(order[start:start + n]),
                              "labels": pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids[first]))})
            cut = int(np.clip(n_train - start, 0, n))
            if cut:
                train.write_table(table.slice(0, cut))
            if cut < n:
                val.write_table(table.slice(cut))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def _step(name: str, times: dict, cpu: dict) -> Iterator[None]:
    """Time a step in wall seconds and in this process's CPU seconds (which other work on the machine cannot
    inflate)."""
    wall, used = time.perf_counter(), _cpu_seconds()
    yield
    times[name], cpu[name] = time.perf_counter() - wall, _cpu_seconds() - used


def measure(root: Path) -> dict:
    """Parse, find duplicates, compute the statistics and split; runs in its own process."""
    from mlcls_ray.data import report
    from mlcls_ray.data.mlcls_format import drop_duplicates, read_dataset, split_rows
    from mlcls_ray.data.problems import ProblemLog
    from mlcls_ray.data.split import split_dataset

    times: dict = {}
    cpu: dict = {}
    with ProblemLog() as problems:
        with _step("parse", times, cpu):
            names, manifest = read_dataset(str(root), problems)
        form = "class ids (CSR)" if manifest.sparse else "packed bits"
        with _step("duplicates", times, cpu):
            manifest = drop_duplicates(manifest, problems)
        with _step("statistics", times, cpu):
            splits = {s: split_rows(manifest, s) for s in ("train", "val")}
            report.label_stats(names, manifest, splits)
            report.cooccurrence(names, manifest)
        assert not len(problems), problems.summary()
        rows, manifest_mb = len(manifest), manifest.nbytes / 2**20
        del manifest, splits
        with _step("split (parse again, stratify, write)", times, cpu):
            assert split_dataset(str(root), 80, 0, problems)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rows": rows, "manifest_mb": manifest_mb, "form": form, "times": times, "cpu": cpu,
            "peak_rss_mb": peak_mb}


def baseline(root: Path, lines: int) -> dict:
    """The old per-line parse (a dataclass per line, labels as a tuple of ints) of the first lines, timed."""
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class ListEntry:  # the shape of the old parser's record
        path: str
        labels: tuple[int, ...]
        file: str
        line: int
        text: str

    tracemalloc.start()
    start = time.perf_counter()
    entries = []
    with open(root / "train.txt", encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno > lines:
                break
            line = raw.rstrip("\r\n")
            path, vector = line.split("\t")
            tokens = [t.strip() for t in vector.split(",")]
            assert all(t in ("0", "1") for t in tokens)
            entries.append(ListEntry(path.strip(), tuple(int(t) for t in tokens), "train.txt", lineno, line))
    elapsed = time.perf_counter() - start
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return {"lines": len(entries), "seconds": elapsed, "bytes_per_line": held / len(entries)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", action="append", metavar="LINES:CLASSES[:parquet]",
                        help="default: 10000000:80, 1000000:1000 and 10000000:11166:parquet")
    parser.add_argument("--workdir", type=Path, default=Path("bench_data/manifest"))
    parser.add_argument("--baseline", type=int, default=200_000, metavar="N",
                        help="time the old per-line parser on N lines of the 80-class lists (0: skip)")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    print(f"machine: {os.cpu_count()} CPUs, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GB")
    for scale in args.scale or ["10000000:80", "1000000:1000", "10000000:11166:parquet"]:
        lines, classes, *form = scale.split(":")
        lines, classes, parquet = int(lines), int(classes), form == ["parquet"]
        root = args.workdir / f"{lines}x{classes}{'-parquet' if parquet else ''}"
        start = time.perf_counter()
        (generate_parquet if parquet else generate)(root, lines, classes)
        lists = ("train.parquet", "val.parquet") if parquet else ("train.txt", "val.txt")
        size = sum((root / f).stat().st_size for f in lists)
        print(f"\n{lines:,} {'Parquet rows' if parquet else 'lines'} x {classes:,} classes: generated "
              f"{size / 2**30:.2f} GB of lists in {time.perf_counter() - start:.0f} s")
        out = subprocess.run([sys.executable, __file__, "--measure", str(root)], capture_output=True, text=True,
                             check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        total = sum(result["times"].values())
        for step, seconds in result["times"].items():
            print(f"  {step:<40} {seconds:7.1f} s  ({result['cpu'][step]:6.1f} s CPU)")
        print(f"  {'total':<40} {total:7.1f} s  ({sum(result['cpu'].values()):6.1f} s CPU); load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print(f"  manifest: {result['manifest_mb']:,.0f} MB ({result['manifest_mb'] * 2**20 / lines:.1f} bytes/image, "
              f"labels as {result['form']}); driver peak RSS {result['peak_rss_mb']:,.0f} MB")
        if parquet:
            packed = lines * ((classes + 7) // 8)
            print(f"  baseline, the bit-packed labels the manifest held before: {packed / 2**30:,.1f} GB for the "
                  f"labels alone -> ratio: the whole manifest is {packed / (result['manifest_mb'] * 2**20):.0f}x "
                  "smaller")
        if args.baseline and classes == 80:
            old = baseline(root, args.baseline)
            scale_up = lines / old["lines"]
            print(f"  baseline, the old per-line parser on {old['lines']:,} lines: {old['seconds']:.1f} s and "
                  f"{old['bytes_per_line']:,.0f} bytes/line held -> for {lines:,} lines about "
                  f"{old['seconds'] * scale_up:,.0f} s and {old['bytes_per_line'] * lines / 2**30:,.1f} GB")
            print(f"  ratio: parse {old['seconds'] * scale_up / result['times']['parse']:.0f}x faster, "
                  f"{old['bytes_per_line'] * lines / (result['manifest_mb'] * 2**20):.0f}x less memory held")
        for name in lists:
            (root / f"{name}.bak").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
