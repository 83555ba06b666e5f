"""Global.mode=audit end to end on a real local Ray: the outputs of given scores against a hand-computed case, and
out-of-fold training (each image scored by the fold model that never trained on it), resumed by a rerun."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlcls_ray.audit.folds import assign_folds
from mlcls_ray.cli import main
from mlcls_ray.data.mlcls_format import read_dataset
from mlcls_ray.data.problems import ProblemLog
from tests.audit.test_confident import LABELS, SCORES
from tests.helpers import make_mlcls, make_quadrants

pytestmark = pytest.mark.usefixtures("ray_start_2_cpus")

_MODEL = "test_resnet_ML"
_TINY = ["Arch.embed_dim=64", "Arch.ffn_dim=128", "Arch.num_heads=2", "Train.image_size=32", "Train.batch_size=16",
         "Train.num_workers=1", "Train.learning_rate=0.003", "Train.augment=none", "Train.ema_decay=0",
         "Train.log_interval=50"]


def _audit(root: Path, out: Path, *overrides: str) -> int:
    settings = ["Global.mode=audit", f"Global.dataset_dir={root}", f"Global.output={out}", "Global.device=cpu",
                *_TINY, *overrides]
    return main(["-c", _MODEL, *[a for s in settings for a in ("-o", s)]])


def test_given_scores_give_the_hand_computed_issues_ranked(tmp_path):
    rows = [(f"images/{i}.jpg", LABELS[i].tolist()) for i in range(6)]
    root = make_mlcls(tmp_path / "ds", ["cat", "<b>dog</b>"], rows[:4], [*rows[4:], ("images/6.jpg", [1, 1])])
    scores = tmp_path / "scores.parquet"
    pq.write_table(pa.table({
        "path": [p for p, _ in rows] + ["images/not_listed.jpg", "images/6.jpg"],  # 6.jpg could not be read
        "scores": pa.array([*SCORES.tolist(), [0.5, 0.5], None], pa.list_(pa.float32())),
    }), scores)
    assert _audit(root, tmp_path / "out", f"Audit.scores={scores}") == 0
    audit = tmp_path / "out" / "audit"
    issues = pq.read_table(audit / "issues.parquet").to_pylist()
    assert [(i["path"], i["class_name"], i["kind"], i["given"], i["suggested"], i["rank"]) for i in issues] == [
        ("images/2.jpg", "cat", "wrong", 1, 0, 1),  # z 1.405: the least trustworthy image
        ("images/5.jpg", "cat", "missing", 0, 1, 2)]  # z 1.404; its dog score 0.95 is no issue: dog has no positives
    assert issues[1]["list_file"] == "val.txt" and issues[1]["line"] == 2
    assert issues[0]["threshold_positive"] == pytest.approx(0.6) and issues[0]["score"] == pytest.approx(0.1)
    assert issues[0]["pair_quality"] == issues[0]["quality"] == pytest.approx(math.erfc(1.4049 / math.sqrt(2)),
                                                                               abs=1e-3)
    result = json.loads((audit / "audit_result.json").read_text())
    assert result["done_flag"] and result["issues"] == {"pairs": 2, "missing": 1, "wrong": 1, "images": 2}
    assert (result["scored_images"], result["failed_images"], result["scores_without_list_line"]) == (6, 1, 1)
    assert (result["images"], result["unscored_images"]) == (7, 1)
    cat, dog = result["classes"]
    assert (cat["estimated_missing_rate"], cat["estimated_wrong_rate"]) == (pytest.approx(1 / 3), pytest.approx(1 / 3))
    assert dog["audited"] is False and dog["threshold_positive"] is None
    page = (audit / "review.html").read_text()
    assert "images/2.jpg" in page and "<b>dog</b>" not in page  # a class name is text, never markup


def test_out_of_fold_scores_come_from_the_model_that_never_saw_the_image(tmp_path, capsys):
    root = make_quadrants(tmp_path / "ds", num_train=96, num_val=32)
    out = tmp_path / "out"
    assert _audit(root, out, "Audit.folds=2", "Train.epochs_iters=2") == 0
    logged = capsys.readouterr().out
    with ProblemLog() as problems:
        _, manifest = read_dataset(str(root), problems)
    fold = dict(zip(manifest.paths.to_pylist(), assign_folds(manifest, 2, seed=0).tolist()))
    scores = pq.read_table(out / "audit" / "oof_scores").to_pylist()
    assert sorted(s["path"] for s in scores) == sorted(fold)  # every image once
    assert all(s["fold"] == fold[s["path"]] and len(s["scores"]) == 4 for s in scores)
    held = np.bincount(list(fold.values()))
    for f in (0, 1):  # fold f trained on the other fold's images and validated on its own
        assert f"on {128 - held[f]} images ({held[f]} val" in logged
    result = json.loads((out / "audit" / "audit_result.json").read_text())
    assert [(r["fold"], r["held_out_images"]) for r in result["folds"]] == [(0, held[0]), (1, held[1])]
    assert all(r["val_mAP"] is not None for r in result["folds"])
    issues = (out / "audit" / "issues.parquet").read_bytes()

    assert _audit(root, out, "Audit.folds=2", "Train.epochs_iters=2") == 0  # a rerun trains nothing again
    assert "training fold" not in capsys.readouterr().out
    assert (out / "audit" / "issues.parquet").read_bytes() == issues

    train = root / "train.txt"  # the lists change (an image dropped): these folds no longer fit them
    train.write_text("".join(train.read_text().splitlines(keepends=True)[1:]))
    assert _audit(root, out, "Audit.folds=2", "Train.epochs_iters=2") == 1
    assert "the folds in this output were made for other lists (images 128 there, 127 now" in capsys.readouterr().err
