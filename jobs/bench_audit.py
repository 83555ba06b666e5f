"""Benchmark: does the label audit find labels flipped on purpose, at least as well as cleanlab on the same scores?

    python jobs/bench_audit.py                      # the digits grid and its pairs variant, 3 folds, 12 epochs
    python jobs/bench_audit.py --quick              # a smoke run of a few minutes: small sets, 2 folds, 2 epochs
    python jobs/bench_audit.py --sets digits -o Audit.folds=5 -o Train.epochs_iters=8

For each set it

1. builds it at 64 px: ``digits``, the demo's digits grid (:mod:`mlcls_ray.data.digits`, smaller than ``make
   demo``'s), or ``pairs``, another draw of it (seed 1) whose ten digits are merged into five classes, 0 or 1, 2 or
   3, ...: denser labels, and classes that each look two ways (the shapes set, :mod:`mlcls_ray.data.synthetic`,
   does not learn in this budget: val mAP 0.28 after 4 epochs on 1,000 images);
2. flips a known 5% of the labels over train + val, seeded: as many flips as 5% of the positive labels, half of them
   removed (a given 1 set to 0), half added (a 0 set to 1), and writes the noisy lists beside hard links to the images;
3. runs ``mlcls -c <model> -o Global.mode=audit`` on the noisy set, as a subprocess;
4. scores the flagged (image, class) pairs against the flips: precision, recall and F1 as flagged, and at the top K
   where K is the number of flips (the issues by pair quality, ties by image rank). cleanlab's
   ``multilabel_classification.filter.find_multilabel_issues_per_class`` gets the audit's own out-of-fold scores
   (``audit/oof_scores/``) and is scored the same way, its top K ranked by its per-class self-confidence; the
   misses are split into removed and added flips, per class (in the JSON);
5. fixes the lists through ``Audit.apply`` with the ``audit_decisions.csv`` a person would download: by default the
   top K issues decided by a reviewer who knows the flips (``--accept all``: every issue accepted unseen), trains
   with the same recipe on the noisy and on the fixed lists, and evaluates both on the clean val labels.

It prints one table and writes ``bench_audit.json`` under ``--output``. cleanlab is AGPL: a benchmark reference in
the test extra, never imported by ``mlcls_ray``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlcls_ray.data.digits import generate_digits  # noqa: E402
from mlcls_ray.data.mlcls_format import LABEL_FILE, format_label_file, format_line, read_splits  # noqa: E402
from mlcls_ray.data.problems import ProblemLog  # noqa: E402

LISTS = ("train.txt", "val.txt")
DECISIONS_HEADER = ["path", "list_file", "line", "class_id", "class_name", "kind", "given", "suggested", "accept"]
# the recipe every training here shares (audit folds, noisy and fixed retrains): make demo's, but one worker of
# batch 32: twice the steps of its global batch 64, which these small sets need to learn in a few epochs
TRAIN = ["Global.device=cpu", "Train.num_workers=1", "Train.image_size=64", "Train.batch_size=32",
         "Train.augment=light", "Train.ema_decay=0", "Train.log_interval=1000"]
SETS = ("digits", "pairs")
SIZES = {False: (900, 300), True: (240, 80)}  # train, val images; --quick's second


def build_set(name: str, root: Path, quick: bool) -> Path:
    """The clean set (kept between runs: the generator is deterministic)."""
    if root.exists():
        return root
    work = root.with_name(root.name + ".partial")
    if work.exists():
        shutil.rmtree(work)  # a generation cut short
    generate_digits(work, *SIZES[quick], size=64, seed=0 if name == "digits" else 1)
    if name == "pairs":
        lists = Lists(work)
        lists.write(work, lists.labels.reshape(len(lists.paths), 5, 2).max(axis=2))  # [N, 5]
        (work / LABEL_FILE).write_text(format_label_file([f"digit_{2 * k}_or_{2 * k + 1}" for k in range(5)]))
        shutil.rmtree(work / "annotations")  # its boxes name digits, not pairs
    work.rename(root)
    return root


class Lists:
    """The rows of train.txt then val.txt: paths, their list file and line, and the dense labels ``[N, C]``."""

    def __init__(self, root: Path):
        with ProblemLog() as problems:
            self.names, train, val = read_splits(str(root), problems)
        self.paths = train.paths.to_pylist() + val.paths.to_pylist()
        self.files = ["train.txt"] * len(train) + ["val.txt"] * len(val)
        self.labels = np.concatenate([train.labels(np.arange(len(train))),
                                      val.labels(np.arange(len(val)))]).astype(np.int8)  # [N, C]
        self.row = {p: i for i, p in enumerate(self.paths)}

    def write(self, root: Path, labels: np.ndarray) -> None:
        """train.txt and val.txt under ``root``: these paths with ``labels`` ``[N, C]``."""
        for name in LISTS:
            rows = [i for i, f in enumerate(self.files) if f == name]
            (root / name).write_text("".join(format_line(self.paths[i], labels[i].tolist()) + "\n" for i in rows))


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)


def linked_copy(root: Path, source: Path) -> Path:
    """A new ``root`` with ``source``'s label.txt and images, hard-linked (the readers refuse a symlink that leaves
    the dataset root), for lists of other labels."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    shutil.copyfile(source / LABEL_FILE, root / LABEL_FILE)
    shutil.copytree(source / "images", root / "images", copy_function=_link)
    return root


def flip(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy labels and the flipped ``(row, class)`` pairs ``[F, 2]``: ``fraction`` of the positives' count, half
    of them removed (1 -> 0), the other half added (0 -> 1), drawn uniformly without replacement."""
    rng = np.random.default_rng(seed)
    count = round(fraction * int(labels.sum()))
    positives, negatives = np.argwhere(labels == 1), np.argwhere(labels == 0)  # [P, 2], [N*C - P, 2]
    removed = positives[rng.choice(len(positives), count // 2, replace=False)]
    added = negatives[rng.choice(len(negatives), count - count // 2, replace=False)]
    flips = np.concatenate([removed, added])  # [F, 2]
    noisy = labels.copy()
    noisy[flips[:, 0], flips[:, 1]] ^= 1
    return noisy, flips


def score(found: list[tuple[int, int]], truth: set[tuple[int, int]]) -> dict:
    """Precision, recall and F1 of ``found`` (row, class) pairs against the ``truth`` pairs."""
    hits = len(set(found) & truth)
    precision = hits / len(found) if found else 0.0
    recall = hits / len(truth) if truth else 0.0
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return {"flagged": len(found), "hits": hits, "precision": precision, "recall": recall, "f1": f1}


def ours(audit_dir: Path, lists: Lists) -> list[tuple[int, int]]:
    """The audit's issues as (row, class) pairs, most likely first: by pair quality (issues.parquet lists them by
    image for a reviewer; the flips are pairs), ties by image rank."""
    table = pq.read_table(audit_dir / "issues.parquet", columns=["path", "class_id", "rank", "pair_quality"])
    order = sorted(zip(table["pair_quality"].to_pylist(), table["rank"].to_pylist(), table["path"].to_pylist(),
                       table["class_id"].to_pylist()))
    return [(lists.row[path], class_id) for _, _, path, class_id in order]


def oof_scores(audit_dir: Path, lists: Lists) -> np.ndarray:
    """The audit's out-of-fold probabilities ``[N, C]`` in the lists' row order."""
    files = sorted(str(f) for f in (audit_dir / "oof_scores").rglob("*.parquet"))
    table = pa.concat_tables(pq.read_table(f, columns=["path", "scores"]) for f in files)
    table = table.filter(pc.is_valid(table["scores"]))  # null: an image the audit could not read
    rows = np.array([lists.row[p] for p in table["path"].to_pylist()])
    probs = np.full(lists.labels.shape, np.nan, np.float32)  # [N, C]
    probs[rows] = np.asarray(table["scores"].combine_chunks().flatten(), np.float32).reshape(len(rows), -1)
    if np.isnan(probs).any():
        raise SystemExit(f"{audit_dir / 'oof_scores'} lacks scores for {int(np.isnan(probs).any(1).sum())} images")
    return probs


def cleanlab_issues(labels: np.ndarray, probs: np.ndarray) -> list[tuple[int, int]]:
    """cleanlab's per-(image, class) issues on the same scores, most likely first (lowest self-confidence)."""
    from cleanlab.multilabel_classification.filter import find_multilabel_issues_per_class
    from cleanlab.multilabel_classification.rank import get_label_quality_scores_per_class

    given = [np.flatnonzero(row).tolist() for row in labels]
    mask = find_multilabel_issues_per_class(given, probs)  # [N, C] bool
    quality = get_label_quality_scores_per_class(given, probs, method="self_confidence")  # [N, C]
    pairs = np.argwhere(mask)  # [I, 2] (row, class)
    order = np.argsort(quality[pairs[:, 0], pairs[:, 1]], kind="stable")
    return [(int(r), int(c)) for r, c in pairs[order]]


def breakdown(found: list[tuple[int, int]], flips: np.ndarray, removed: int, names: list[str]) -> dict:
    """Recall on the removed and on the added flips, and per class."""
    found = set(found)
    hit = np.array([(int(r), int(c)) in found for r, c in flips])  # [F]
    per_class = {}
    for c, name in enumerate(names):
        rem, add = flips[:removed, 1] == c, flips[removed:, 1] == c
        per_class[name] = {"removed": int(rem.sum()), "found_removed": int(hit[:removed][rem].sum()),
                           "added": int(add.sum()), "found_added": int(hit[removed:][add].sum())}
    return {"recall_removed": float(hit[:removed].mean()), "recall_added": float(hit[removed:].mean()),
            "per_class": per_class}


def mlcls(args: list[str], log: Path) -> None:
    """One ``mlcls`` run in its own process (and its own local Ray), niced; its output goes to ``log``."""
    exe = shutil.which("mlcls", path=str(Path(sys.executable).parent)) or shutil.which("mlcls")
    with open(log, "w") as out:
        code = subprocess.run(["nice", "-n", "10", exe, *args], stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        raise SystemExit("\n".join([*tail, f"mlcls {' '.join(args)} failed with exit code {code}; log: {log}"]))


def _opts(settings: list[str]) -> list[str]:
    return [a for s in settings for a in ("-o", s)]


def write_decisions(audit_dir: Path, path: Path, flipped: set[tuple[str, int]] | None, top: int) -> int:
    """audit_decisions.csv as the review page writes it: every issue accepted (``flipped`` None), or the ``top``
    issues by pair quality decided by a reviewer who knows the flips (accepted if flipped, else rejected), as a
    person working down the page would. Returns how many were accepted."""
    table = sorted(pq.read_table(audit_dir / "issues.parquet").to_pylist(), key=lambda r: (r["pair_quality"],
                                                                                         r["rank"]))
    if flipped is not None:
        table = table[:top]
    accept = [flipped is None or (row["path"], row["class_id"]) in flipped for row in table]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(DECISIONS_HEADER)
        writer.writerows([*(row[k] for k in DECISIONS_HEADER[:-1]), str(a).lower()] for row, a in zip(table, accept))
    return sum(accept)


def val_map(model: str, train_root: Path, clean: Path, out: Path, train: list[str]) -> float:
    """Train on ``train_root``'s lists, evaluate the best model on the clean val labels; the val mAP."""
    out.mkdir()
    mlcls(["-c", model, *_opts(["Global.mode=train", f"Global.dataset_dir={train_root}",
                                f"Global.output={out / 'train'}", *train])], out / "train.log")
    mlcls(["-c", model, *_opts(["Global.mode=evaluate", f"Global.dataset_dir={clean}", "Global.device=cpu",
                                f"Global.output={out / 'evaluate'}",
                                f"Evaluate.weight_path={out / 'train' / 'best_model'}"])], out / "evaluate.log")
    return float(json.loads((out / "evaluate" / "evaluate_result.json").read_text())["metrics"]["MultiLabelMAP"])


def bench_set(name: str, args: argparse.Namespace, train: list[str], audit: list[str]) -> dict:
    out = Path(args.output) / name
    if out.exists() and not args.resume:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    for retrain in ("noisy", "fixed", "apply"):
        shutil.rmtree(out / retrain, ignore_errors=True)
    data = Path(args.data) / f"audit_{name}{'_quick' if args.quick else ''}"
    clean = build_set(name, data / "clean", args.quick)
    lists = Lists(clean)
    noisy_labels, flips = flip(lists.labels, args.noise, args.seed)
    removed = len(flips) // 2
    lists.write(linked_copy(data / "noisy", clean), noisy_labels)
    truth = {(int(r), int(c)) for r, c in flips}
    with open(out / "flips.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "list_file", "class_id", "change")] + [
            (lists.paths[r], lists.files[r], int(c), "removed" if i < removed else "added")
            for i, (r, c) in enumerate(flips)])
    result = {"images": len(lists.paths), "classes": len(lists.names), "positives": int(lists.labels.sum()),
              "flips": len(flips), "removed": removed, "added": len(flips) - removed}
    print(f"{name}: {result['images']} images, {result['positives']} positive labels, {len(flips)} flipped "
          f"({removed} removed, {len(flips) - removed} added)", flush=True)

    started = time.perf_counter()
    audit_out = out / "audit_run"
    mlcls(["-c", args.model, *_opts(["Global.mode=audit", f"Global.dataset_dir={data / 'noisy'}",
                                     f"Global.output={audit_out}", *train, *audit])], out / "audit.log")
    result["audit_s"] = time.perf_counter() - started
    audit_dir = audit_out / "audit"
    folds = json.loads((audit_dir / "audit_result.json").read_text())["folds"]
    result["fold_val_map"] = [f["val_mAP"] for f in folds]
    found = ours(audit_dir, lists)
    started = time.perf_counter()
    reference = cleanlab_issues(noisy_labels, oof_scores(audit_dir, lists))
    result["cleanlab_s"] = time.perf_counter() - started
    for method, issues in (("ours", found), ("cleanlab", reference)):
        result[method] = {"as_flagged": score(issues, truth), "top_k": score(issues[:len(flips)], truth),
                          **breakdown(issues, flips, removed, lists.names)}
    print(f"{name}: audit {result['audit_s']:.0f} s, ours F1 {result['ours']['as_flagged']['f1']:.3f}, "
          f"cleanlab F1 {result['cleanlab']['as_flagged']['f1']:.3f}", flush=True)
    if args.no_retrain:
        return result

    decisions = out / "audit_decisions.csv"
    flipped = None if args.accept == "all" else {(lists.paths[r], c) for r, c in truth}
    result["accepted"] = write_decisions(audit_dir, decisions, flipped, len(flips))
    result["accept"] = args.accept
    lists.write(linked_copy(data / "fixed", clean), noisy_labels)
    mlcls(["-c", args.model, *_opts(["Global.mode=audit", f"Global.dataset_dir={data / 'fixed'}",
                                     f"Global.output={out / 'apply'}", "Global.device=cpu",
                                     f"Audit.apply={decisions}"])], out / "apply.log")
    fixed = Lists(data / "fixed")
    fixed_labels = fixed.labels[[fixed.row[p] for p in lists.paths]]
    result["label_errors"] = {"noisy": int((noisy_labels != lists.labels).sum()),
                              "fixed": int((fixed_labels != lists.labels).sum())}
    started = time.perf_counter()
    result["map_noisy"] = val_map(args.model, data / "noisy", clean, out / "noisy", train)
    result["map_fixed"] = val_map(args.model, data / "fixed", clean, out / "fixed", train)
    result["retrain_s"] = time.perf_counter() - started
    print(f"{name}: clean val mAP {result['map_noisy']:.3f} trained on the noisy lists, {result['map_fixed']:.3f} on "
          f"the fixed ones", flush=True)
    return result


def _row(label: str, a: dict, b: dict) -> str:
    ratio = f"{a['f1'] / b['f1']:.2f}" if b["f1"] else "-"
    return (f"  {label:10} {a['flagged']:>5} {a['precision']:6.3f} {a['recall']:6.3f} {a['f1']:6.3f}   "
            f"{b['flagged']:>5} {b['precision']:6.3f} {b['recall']:6.3f} {b['f1']:6.3f} {ratio:>6}")


def report(results: dict, header: str) -> None:
    print(f"\n{header}")
    for name, r in results.items():
        print(f"{name}: {r['images']} images, {r['classes']} classes, {r['flips']} flips ({r['removed']} removed, "
              f"{r['added']} added); audit {r['audit_s']:.0f} s, folds' val mAP on noisy labels "
              f"{', '.join(f'{m:.3f}' for m in r['fold_val_map'])}")
        print(f"  {'':10} {'ours':>5} {'P':>6} {'R':>6} {'F1':>6}   {'clean':>5} {'P':>6} {'R':>6} {'F1':>6} "
              f"{'ratio':>6}")
        for key, label in (("as_flagged", "as flagged"), ("top_k", f"top {r['flips']}")):
            print(_row(label, r["ours"][key], r["cleanlab"][key]))
        print(f"  recall on removed / added flips: ours {r['ours']['recall_removed']:.3f} / "
              f"{r['ours']['recall_added']:.3f}, cleanlab {r['cleanlab']['recall_removed']:.3f} / "
              f"{r['cleanlab']['recall_added']:.3f}")
        if "map_noisy" in r:
            how = ("accepting every issue" if r["accept"] == "all" else
                   f"a review of the top {r['flips']} ({r['accepted']} accepted)")
            print(f"  label errors {r['label_errors']['noisy']} -> {r['label_errors']['fixed']} after {how}; "
                  f"clean val mAP {r['map_noisy']:.3f} -> {r['map_fixed']:.3f} "
                  f"({r['map_fixed'] - r['map_noisy']:+.3f}); retraining {r['retrain_s']:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18_ML", help="a preset or <timm model>_ML")
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--quick", action="store_true", help="a smoke run: small sets, 2 folds, 2 epochs")
    parser.add_argument("--noise", type=float, default=0.05, help="flips, as a fraction of the positive labels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the flips")
    parser.add_argument("--no-retrain", action="store_true", help="detection only: skip apply and the two trainings")
    parser.add_argument("--accept", choices=("reviewed", "all"), default="reviewed",
                        help="what Audit.apply gets: the top K issues as a reviewer who knows the flips decides them "
                             "(default), or every issue accepted unseen")
    parser.add_argument("--resume", action="store_true",
                        help="keep each set's audit output: the audit resumes (scored folds are not trained again)")
    parser.add_argument("--data", default="bench_data")
    parser.add_argument("--output", default="output/bench_audit")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a config setting for every run (audit folds and retrains), e.g. -o Audit.folds=5")
    args = parser.parse_args()
    unknown = set(args.sets.split(",")) - set(SETS)
    if unknown:
        parser.error(f"unknown sets {sorted(unknown)}; choose from {', '.join(SETS)}")
    epochs = 2 if args.quick else 12  # at 6 the folds' models reach val mAP 0.5 and flag 18% of all pairs
    train = [*TRAIN, f"Train.epochs_iters={epochs}", f"Train.save_interval={epochs}",
             *(o for o in args.override if not o.startswith("Audit."))]
    audit = [f"Audit.folds={2 if args.quick else 3}", *(o for o in args.override if o.startswith("Audit."))]
    started = time.perf_counter()
    results = {name: bench_set(name, args, train, audit) for name in args.sets.split(",")}
    header = (f"{args.model}, {' '.join(f'-o {o}' for o in [*train, *audit])}; {args.noise:.0%} of the positive "
              f"labels' count flipped (seed {args.seed}), {os.cpu_count()} CPUs, {time.perf_counter() - started:.0f} s")
    report(results, header)
    path = Path(args.output) / "bench_audit.json"
    path.write_text(json.dumps({"settings": header, "sets": results}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
