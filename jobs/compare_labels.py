"""Show bulk labels beside a dataset's true labels: a spot check of what a model labels, as a person would do it.

    python jobs/compare_labels.py output/demo/labels demo_data             # 8 rows, and agreement over 2,000
    python jobs/compare_labels.py s3://b/labels s3://b/dataset --rows 20 --sample 10000

LABELS is a ``Global.mode=label`` output folder; DATASET an MLClsDataset whose ``train.txt`` and ``val.txt`` list
the labeled images. Rows are matched by their path relative to the dataset root. Only the first ``--sample`` labeled
rows are read (part files in order), so the check costs the same on a 100M-image output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlcls_ray import storage  # noqa: E402
from mlcls_ray.data.mlcls_format import read_dataset  # noqa: E402
from mlcls_ray.data.problems import ProblemLog  # noqa: E402


def _relative(path: str, root: str) -> str:
    root = storage.absolute(root).rstrip("/") + "/"
    absolute = storage.absolute(path)
    return absolute[len(root):] if absolute.startswith(root) else path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("labels")
    parser.add_argument("dataset")
    parser.add_argument("--rows", type=int, default=8, help="rows to print")
    parser.add_argument("--sample", type=int, default=2000, help="rows the agreement is measured on")
    args = parser.parse_args()

    with ProblemLog() as problems:
        names, manifest = read_dataset(args.dataset, problems)
    if names is None:
        raise SystemExit(f"{args.dataset}: not an MLClsDataset (run check_dataset)")
    fs, path = storage.resolve(args.labels)
    parts = pads.dataset(path, filesystem=fs, format="parquet", ignore_prefixes=["_", "."])  # not _plan/, not .tmp-*
    labeled = parts.head(args.sample, columns=["path", "class_ids"])
    truth = dict(zip(manifest.paths.to_pylist(), range(len(manifest))))
    shown, exact, f1s = 0, 0, []
    print(f"{'image':28} {'labeled':40} true")
    for row in labeled.to_pylist():
        i = truth.get(_relative(row["path"], args.dataset))
        if i is None:
            continue
        true = set(np.flatnonzero(manifest.labels(np.array([i]))[0]).tolist())
        got = set(row["class_ids"] or [])
        exact += got == true
        f1s.append(2 * len(got & true) / (len(got) + len(true)) if got or true else 1.0)
        if shown < args.rows:
            mark = "ok " if got == true else "   "
            print(f"{mark}{Path(row['path']).name:25} {', '.join(names[c] for c in sorted(got)) or '-':40} "
                  f"{', '.join(names[c] for c in sorted(true)) or '-'}")
            shown += 1
    if not f1s:
        raise SystemExit(f"none of the first {args.sample:,} labeled paths is listed in {args.dataset}")
    print(f"over {len(f1s):,} labeled images listed in the dataset: all labels right on {exact / len(f1s):.1%}, "
          f"mean per-image F1 {np.mean(f1s):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
