"""``Global.mode=audit``: out-of-fold scores for every image, then the (image, class) labels they contradict.

1. train + val are pooled and cut into ``Audit.folds`` stratified folds; fold ``f``'s model is a normal training
   run (the config's recipe, its own checkpoints under ``audit/folds/fold_<f>/``) on the other folds, with fold
   ``f`` as its val set, and then scores fold ``f``. So every image is scored by a model whose weights never saw
   its labels (fold ``f``'s labels pick the best epoch, as any val set does). Folds run side by side when the
   cluster has room for several trainings, else one after another; a rerun skips the folds that were scored and
   resumes the others from their latest checkpoint. ``Audit.scores`` names finished scores instead.
2. :mod:`mlcls_ray.audit.confident` reads the scores twice, a batch at a time (per-class thresholds, then the
   flags), joined by path with the labels the lists hold now.
3. Under ``<Global.output>/audit/``: ``issues.parquet``, ``audit_result.json`` and ``review.html``.

``Audit.apply`` runs :mod:`mlcls_ray.audit.apply` instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from mlcls_ray import results, storage
from mlcls_ray.audit.apply import run_apply
from mlcls_ray.audit.confident import ClassTally, Thresholds, flag_pairs, pair_quality
from mlcls_ray.audit.folds import assign_folds
from mlcls_ray.audit.review_page import review_page
from mlcls_ray.config import Config, device_count
from mlcls_ray.data.manifest import Manifest
from mlcls_ray.data.manifest_rows import staging
from mlcls_ray.data.mlcls_format import drop_duplicates, read_dataset
from mlcls_ray.data.pipeline import read_images
from mlcls_ray.data.problems import ProblemLog
from mlcls_ray.infer.actors import inference_actors
from mlcls_ray.infer.predictor import Predictor

__all__ = ["AUDIT_DIR", "AUDIT_RESULT", "ISSUES_FILE", "REVIEW_PAGE", "SCORES_DIR", "parallel_folds", "run_audit"]

AUDIT_DIR = "audit"
AUDIT_RESULT = "audit_result.json"
ISSUES_FILE = "issues.parquet"
REVIEW_PAGE = "review.html"
SCORES_DIR = "oof_scores"  # one folder of Parquet files per fold: path, fold, scores (probabilities, class order)
_SCORED = "scored.json"  # in a fold's folder once its scores are complete
_PLAN = "plan.json"  # beside the folds: which image is in which fold
_BATCH_ROWS = 8192


class _OofScorer:
    """Ray Data actor: decoded rows of a held-out fold -> ``path``, ``fold``, ``error_kind`` and ``scores`` (the
    probabilities of every class; null for an image that could not be read)."""

    def __init__(self, model: str, device: str, threads: int, fold: int):
        import torch

        torch.set_num_threads(threads)
        self.predictor = Predictor(model, device)
        self.fold = fold

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        good = batch["error_kind"] == ""
        c = self.predictor.info.spec.num_classes
        probs = np.zeros((len(good), c), np.float32)  # [B, C]
        if good.any():
            probs[good] = self.predictor.probabilities(self.predictor.preprocess(list(batch["image"][good])))
        scores = pa.FixedSizeListArray.from_arrays(pa.array(probs.ravel()), c).cast(pa.list_(pa.float32()))
        return pa.table({"path": pa.array(batch["path"], pa.string()),
                         "fold": pa.array(np.full(len(good), self.fold, np.int8)),
                         "error_kind": pa.array(batch["error_kind"], pa.string()),
                         "scores": pc.if_else(pa.array(good), scores, pa.nulls(len(good), scores.type))})


def parallel_folds(cfg: Config, folds: int) -> int:
    """How many fold trainings the cluster holds at once: GPUs over workers per run; on CPU, half of the CPUs (the
    other half decodes, as for one run) over what one run reserves."""
    device = cfg["Global.device"]
    workers = cfg["Train.num_workers"] or device_count(device)
    cpus, gpus = (float(ray.cluster_resources().get(k, 0)) for k in ("CPU", "GPU"))
    if device.startswith("gpu"):
        room = int(gpus // workers)
    else:
        per_run = workers * (cfg["Train.cpus_per_worker"] or cpus / 2 / workers)
        room = math.floor(cpus / 2 / per_run + 1e-9)
    return max(1, min(folds, room))


def run_audit(cfg: Config) -> int:
    """Audit (or, with ``Audit.apply``, apply reviewed decisions); returns the exit code. A failure leaves a
    ``done_flag: false`` record in ``audit_result.json``."""
    if cfg["Audit.apply"] is not None:
        return run_apply(cfg)
    out = storage.absolute(storage.join(cfg["Global.output"], AUDIT_DIR))
    with results.failure_recorded(out, AUDIT_RESULT):
        return _audit(cfg, out)


def _read(root: str) -> tuple[list[str], Manifest]:
    with ProblemLog() as problems:
        names, manifest = read_dataset(root, problems)
        manifest = drop_duplicates(manifest, problems)
        if len(problems):
            print(f"mlcls: the dataset lists have problems; those lines are not audited:\n{problems.summary()}",
                  file=sys.stderr)
    if names is None:
        raise ValueError(f"{root}: label.txt is missing or has problems; run check_dataset")
    if not len(manifest):
        raise ValueError(f"{root}: train and val list no images")
    return names, manifest


def _audit(cfg: Config, out: str) -> int:
    root = storage.absolute(cfg["Global.dataset_dir"].rstrip("/"))
    names, manifest = _read(root)
    folds_report: list[dict] = []
    scores_uri = cfg["Audit.scores"]
    if scores_uri is None:
        scores_uri = storage.join(out, SCORES_DIR)
        folds_report = _score_out_of_fold(cfg, root, names, manifest, out)
    files = _score_files(scores_uri)
    rows = _rows(files, manifest)
    thresholds, tally, joined = _thresholds(files, rows, manifest)
    issues, joint = _issues(files, rows, manifest, names, thresholds)
    del rows
    written = {"issues": storage.join(out, ISSUES_FILE), "review_page": storage.join(out, REVIEW_PAGE),
               "scores": scores_uri}
    with storage.open_output(written["issues"]) as f:
        pq.write_table(issues, f, compression="zstd")
    limit = cfg["Audit.review_limit"]
    storage.write_text(written["review_page"], review_page(
        "issues", issues.slice(0, limit), lambda p: storage.join(root, p), names,
        title=f"label audit of {root}: top {min(limit, len(issues)):,} of {len(issues):,} issues",
        max_pixels=cfg["Global.max_image_pixels"], max_file_bytes=cfg["Global.max_file_bytes"]))
    kinds = pc.value_counts(issues["kind"]).to_pylist()
    counts = {k["values"]: k["counts"] for k in kinds}
    result = {
        "done_flag": True, "dataset_dir": root, "images": len(manifest), "scored_images": joined["scored"],
        "unscored_images": len(manifest) - joined["scored"], "scores_without_list_line": joined["unknown"],
        "failed_images": joined["failed"], "folds": folds_report,
        "issues": {"pairs": len(issues), "missing": counts.get("missing", 0), "wrong": counts.get("wrong", 0),
                   "images": len(pc.unique(issues["path"])) if len(issues) else 0},
        "classes": _class_report(names, tally, thresholds, joint, issues),
        "files": written,
    }
    uri = results.write_result(out, AUDIT_RESULT, result)
    print(f"audit: {len(issues):,} issues ({counts.get('missing', 0):,} likely missing, {counts.get('wrong', 0):,} "
          f"likely wrong) in {result['issues']['images']:,} of {joined['scored']:,} scored images; "
          f"review: {written['review_page']}; result: {uri}")
    return 0


def _score_out_of_fold(cfg: Config, root: str, names: list[str], manifest: Manifest, out: str) -> list[dict]:
    """Train and score every fold not yet scored; returns each fold's record for ``audit_result.json``."""
    from mlcls_ray.train.run import run_train  # Ray Train's import is slow; only the fold runs need it

    k = cfg["Audit.folds"]
    order = manifest.path_order()
    fold = assign_folds(manifest, k, cfg["Train.seed"], order)
    _check_plan(storage.join(out, "folds", _PLAN), manifest, order, fold, k, cfg["Train.seed"])
    del order
    todo = [f for f in range(k) if not storage.exists(storage.join(out, "folds", f"fold_{f}", _SCORED))]
    at_once = parallel_folds(cfg, len(todo)) if todo else 1
    if todo:
        print(f"audit: {len(manifest):,} images in {k} folds; training fold(s) {', '.join(map(str, todo))}, "
              f"{at_once} at a time")

    def one(f: int) -> None:
        fold_out = storage.join(out, "folds", f"fold_{f}")
        fold_cfg = dataclasses.replace(cfg, values={**cfg.values, "Global.output": fold_out,
                                                    "Train.resume_path": "auto"})
        held = fold == f
        code = run_train(fold_cfg, (names, manifest.select(~held), manifest.select(held)))
        if code != 0:
            raise RuntimeError(f"fold {f}'s training ended without a model (exit {code}); see "
                               f"{storage.join(fold_out, results.TRAIN_RESULT)}")
        _score_fold(cfg, root, manifest.select(held), f, fold_out, storage.join(out, SCORES_DIR, f"fold_{f}"))

    with ThreadPoolExecutor(at_once) as pool:
        for done in [pool.submit(one, f) for f in todo]:
            done.result()
    return [_fold_record(out, f) for f in range(k)]


def _check_plan(uri: str, manifest: Manifest, order: np.ndarray, fold: np.ndarray, k: int, seed: int) -> None:
    """Record which image is in which fold (``order``: the manifest's path order); refuse to go on with folds made
    for other lists (a rerun after the lists or ``Audit.folds`` changed would mix scores of two splits and leave
    images unscored)."""
    digest = hashlib.sha256(fold[order].tobytes())
    for buffer in manifest.paths.take(pa.array(order)).combine_chunks().buffers()[1:]:
        digest.update(buffer)
    plan = {"folds": k, "seed": seed, "images": len(manifest), "assignment_sha256": digest.hexdigest()}
    if not storage.exists(uri):
        storage.write_text(uri, json.dumps(plan) + "\n")
        return
    made = json.loads(storage.read_text(uri))
    if made != plan:
        changed = ", ".join(f"{key} {made.get(key)} there, {plan[key]} now" for key in plan
                            if made.get(key) != plan[key])
        raise ValueError(f"{uri}: the folds in this output were made for other lists ({changed}); audit into a new "
                         "Global.output, or give their scores as Audit.scores to audit the lists as they are now")


def _score_fold(cfg: Config, root: str, held: Manifest, f: int, fold_out: str, scores: str) -> None:
    storage.delete_dir(scores)  # the rows of a run killed while it wrote them
    model = storage.join(fold_out, "best_model")
    actors = inference_actors(cfg["Global.device"])
    kwargs = actors.pop("fn_constructor_kwargs")
    with staging(fold_out) as stage:
        ds = read_images(held, root, image="rgb", max_pixels=cfg["Global.max_image_pixels"],
                         max_file_bytes=cfg["Global.max_file_bytes"], stage=stage).map_batches(
            _OofScorer, fn_constructor_kwargs={"model": model, "fold": f, **kwargs},
            batch_size=cfg["Evaluate.batch_size"], batch_format="numpy", **actors)
        fs, path = storage.resolve(scores)
        ds.write_parquet(path, filesystem=fs)
    storage.write_text(storage.join(fold_out, _SCORED), json.dumps({"fold": f, "images": len(held)}) + "\n")


def _fold_record(out: str, f: int) -> dict:
    fold_out = storage.join(out, "folds", f"fold_{f}")
    best = json.loads(storage.read_text(storage.join(fold_out, results.TRAIN_RESULT)))["models"].get("best", {})
    images = json.loads(storage.read_text(storage.join(fold_out, _SCORED)))["images"]
    return {"fold": f, "held_out_images": images, "val_mAP": best.get("score"), "best_epoch": best.get("epoch"),
            "output": fold_out}


def _score_files(uri: str) -> list[str]:
    if uri.endswith(".parquet") and not storage.is_dir(uri):
        return [uri]
    files = [storage.join(uri, p) for p in storage.list_files(uri) if p.endswith(".parquet")]
    if not files:
        raise ValueError(f"{uri}: no Parquet scores found (expected files with columns path and scores)")
    return files


def _open(file: str) -> pq.ParquetFile:
    reader = pq.ParquetFile(storage.open_input(file, seekable=True))
    missing = {"path", "scores"} - set(reader.schema_arrow.names)
    if missing:
        raise ValueError(f"{file}: no column {', '.join(sorted(missing))} (expected path and scores)")
    return reader


def _rows(files: list[str], manifest: Manifest) -> list[np.ndarray]:
    """Each score file's rows' manifest rows (-1 for a path the lists do not hold): one join for all files, so the
    lists' paths are hashed once, not once a batch."""
    paths = [_open(file).read(columns=["path"])["path"].cast(pa.string()) for file in files]
    rows = pc.index_in(pa.chunked_array([c for p in paths for c in p.chunks], pa.string()),
                       value_set=manifest.paths).fill_null(-1).to_numpy().astype(np.int64)
    return np.split(rows, np.cumsum([len(p) for p in paths])[:-1])


def _batches(files: list[str], rows: list[np.ndarray], manifest: Manifest, failed: list[int] | None = None
             ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(manifest rows [B], scores [B, C])`` of every scored image whose path the lists hold, file by file;
    listed rows with null scores (images that could not be read) are counted in ``failed[0]``.

    Raises:
        ValueError: a row's scores are not one per class.
    """
    c = manifest.num_classes
    for file, file_rows in zip(files, rows):
        start = 0
        for batch in _open(file).iter_batches(batch_size=_BATCH_ROWS, columns=["scores"]):
            here = file_rows[start:start + batch.num_rows]
            start += batch.num_rows
            valid = batch["scores"].is_valid().to_numpy(zero_copy_only=False)
            if failed is not None:
                failed[0] += int((~valid & (here >= 0)).sum())
            keep = valid & (here >= 0)
            lists = batch["scores"].filter(pa.array(keep))
            lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
            if np.any(lengths != c):
                raise ValueError(f"{file}: a row has {int(lengths[lengths != c][0])} scores; the dataset has {c} "
                                 "classes")
            scores = pc.list_flatten(lists).to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, c)
            yield here[keep], scores


def _thresholds(files: list[str], rows: list[np.ndarray], manifest: Manifest
                ) -> tuple[Thresholds, ClassTally, dict[str, int]]:
    """Pass 1: the class sums, and the counts of scored, failed (null scores) and unknown-path rows."""
    tally = ClassTally.zeros(manifest.num_classes)
    scored, failed = 0, [0]
    for batch_rows, scores in _batches(files, rows, manifest, failed):
        tally.add(scores, manifest.labels(batch_rows))
        scored += len(batch_rows)
    if not scored:
        raise ValueError(f"{files[0]}: none of the scores' paths is in the dataset's lists")
    unknown = int(sum((r < 0).sum() for r in rows))
    return tally.thresholds(), tally, {"scored": scored, "failed": failed[0], "unknown": unknown}


def _issues(files: list[str], rows_by_file: list[np.ndarray], manifest: Manifest, names: list[str],
            thresholds: Thresholds) -> tuple[pa.Table, np.ndarray]:
    """Pass 2: the flagged pairs as ``issues.parquet``'s table, ranked, and the confident joint ``[2, 2, C]``."""
    found: list[tuple[np.ndarray, ...]] = []
    joint = np.zeros((2, 2, manifest.num_classes), np.int64)
    for rows, scores in _batches(files, rows_by_file, manifest):
        labels = manifest.labels(rows)
        r, c, z, part = flag_pairs(scores, labels, thresholds)
        joint += part
        found.append((rows[r], c, z, labels[r, c].astype(np.int8), scores[r, c]))
    rows, classes, z, given, score = (np.concatenate(parts) for parts in zip(*found))
    worst = np.full(len(manifest), -np.inf, np.float32)
    np.maximum.at(worst, rows, z)  # each flagged image's most atypical pair: its quality
    images = np.unique(rows)
    by_quality = images[np.argsort(-worst[images], kind="stable")]  # np.unique sorts by row: ties keep list order
    rank = np.zeros(len(manifest), np.int64)
    rank[by_quality] = np.arange(1, len(images) + 1)
    quality = pair_quality(z)
    order = np.lexsort((quality, rank[rows]))
    rows, classes, given, score, quality = (a[order] for a in (rows, classes, given, score, quality))
    take = pa.array(rows)
    table = pa.table({
        "path": manifest.paths.take(take),
        "list_file": pa.array(np.asarray(manifest.files, dtype=object)[manifest.file[rows]], pa.string()),
        "line": pa.array(manifest.line[rows].astype(np.int64)),
        "class_id": pa.array(classes.astype(np.int32)),
        "class_name": pa.array(np.asarray(names, dtype=object)[classes], pa.string()),
        "kind": pa.array(np.where(given == 0, "missing", "wrong").astype(object), pa.string()),
        "given": pa.array(given),
        "suggested": pa.array((1 - given).astype(np.int8)),
        "score": pa.array(score.astype(np.float32)),
        "threshold_positive": pa.array(thresholds.positive[classes]),
        "threshold_negative": pa.array(thresholds.negative[classes]),
        "pair_quality": pa.array(quality),
        "quality": pa.array(pair_quality(worst[rows])),
        "rank": pa.array(rank[rows]),
    })
    return table, joint


def _class_report(names: list[str], tally: ClassTally, thresholds: Thresholds, joint: np.ndarray,
                  issues: pa.Table) -> list[dict]:
    """Per class: label counts, thresholds, flagged counts and the noise rates the confident joint estimates."""
    c = len(names)
    flagged = {kind: np.bincount(issues.filter(pc.equal(issues["kind"], kind))["class_id"].to_numpy(),
                                 minlength=c) for kind in ("missing", "wrong")}
    with np.errstate(invalid="ignore", divide="ignore"):
        missing_rate = joint[0, 1] / (joint[0, 0] + joint[0, 1])  # among confident given-0 pairs, the 1s
        wrong_rate = joint[1, 0] / (joint[1, 0] + joint[1, 1])

    def num(x: float) -> float | None:
        return None if not np.isfinite(x) else round(float(x), 6)

    return [{"class_id": k, "name": names[k], "positives": int(tally.positives[k]),
             "negatives": int(tally.negatives[k]), "audited": bool(thresholds.audited[k]),
             "threshold_positive": num(thresholds.positive[k]), "threshold_negative": num(thresholds.negative[k]),
             "missing": int(flagged["missing"][k]), "wrong": int(flagged["wrong"][k]),
             "estimated_missing_rate": num(missing_rate[k]), "estimated_wrong_rate": num(wrong_rate[k])}
            for k in range(c)]
