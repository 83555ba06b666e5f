"""``Label.review``: the uncertainty against a hand-computed case, and a real label run whose review queue holds the
images of highest uncertainty recomputed from the full scores, failed ones never."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlcls_ray.infer import label_output
from mlcls_ray.infer.predictor import Predictor
from mlcls_ray.infer.review_queue import select, uncertainty
from tests.infer.test_label import _images, _label, _table


def test_uncertainty_by_hand():
    probs = np.array([[0.5, 0.9], [0.2, 0.6], [1.0, 0.0]], np.float32)
    t = np.array([0.5, 0.6], np.float32)
    # row 0: class 0 at its threshold adds 1; class 1: odds 9 against 1.5, exp(-|log 6|) = 1/6
    # row 1: class 0: odds 1/4 against 1 adds 1/4; class 1 at its threshold adds 1
    # row 2: clipped to 1 - 1e-6 and 1e-6: odds about 1e6 away from the thresholds' in both directions
    expected = [1 + 1 / 6, 1.25, 1e-6 / (1 - 1e-6) + 1e-6 / (1 - 1e-6) / 1.5]
    np.testing.assert_allclose(uncertainty(probs, t), expected, rtol=1e-5)
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731 - the definition the docstring gives
    p, tt = np.clip(probs[:2].astype(np.float64), 1e-6, 1 - 1e-6), t.astype(np.float64)
    np.testing.assert_allclose(uncertainty(probs[:2], t), np.exp(-np.abs(logit(p) - logit(tt))).sum(1), rtol=1e-6)
    assert uncertainty(probs, t).dtype == np.float32


def test_select_keeps_a_running_top_n_across_parts(tmp_path):
    """Parts as ``Label.scores=top:6`` keeps them: ties go to the earlier row, a failed image (null) never enters, a
    part with nothing better than the current top N is passed over, and the top classes are cut to 5."""
    parts = [[0.5, None, 2.0], [2.0, 0.1], [3.0, 0.5, 2.0]]
    for shard, us in enumerate(parts):
        n = len(us)
        ids = np.tile(np.arange(6, dtype=np.int32), n)
        pq.write_table(pa.table({
            "path": [f"{shard}-{i}" for i in range(n)], "label_names": [["x"]] * n,
            "top_class_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids), 6),
            "top_scores": pa.FixedSizeListArray.from_arrays(pa.array(ids / 10, pa.float16()), 6),
            "uncertainty": pa.array(us, pa.float32())}), label_output.part_uri(str(tmp_path), shard))
    best = select(str(tmp_path), 3, 3)
    assert best["path"].to_pylist() == ["2-0", "0-2", "1-0"] and best["uncertainty"].to_pylist() == [3, 2, 2]
    assert best["top_class_ids"].to_pylist() == [[0, 1, 2, 3, 4]] * 3
    np.testing.assert_allclose(best["top_scores"].to_pylist()[0], [0, 0.1, 0.2, 0.3, 0.4], atol=1e-3)
    assert select(str(tmp_path), 1, 5)["path"].to_pylist() == ["0-2", "0-0"]  # fewer good images than N


@pytest.mark.usefixtures("ray_start_2_cpus")
def test_label_review_queue(tiny_model, tmp_path, capsys):
    source, out = _images(tmp_path / "in", 9), tmp_path / "out"  # 9 images, a non-image and a truncated PNG
    assert _label(tiny_model, str(source), str(out), "Label.shard_size=4", "Label.review=3") == 0  # 3 parts

    rows = _table(str(out)).to_pylist()  # parts in plan order
    good = [r for r in rows if r["error"] is None]
    assert len(rows) == 11 and len(good) == 9 and all(r["uncertainty"] is None for r in rows if r["error"])
    u = uncertainty(np.array([r["scores"] for r in good], np.float32), Predictor(tiny_model).thresholds)
    np.testing.assert_allclose([r["uncertainty"] for r in good], u, rtol=1e-6)
    top = np.argsort(-u, kind="stable")[:3]

    review = pq.read_table(out / "review.parquet")
    assert review.column_names == ["path", "rank", "uncertainty", "label_names", "top_class_ids", "top_class_names",
                                   "top_scores", "top_thresholds"]
    queue = review.to_pylist()
    assert [r["path"] for r in queue] == [good[i]["path"] for i in top] and [r["rank"] for r in queue] == [1, 2, 3]
    names, thresholds = Predictor(tiny_model).label_names, Predictor(tiny_model).thresholds
    for r, i in zip(queue, top):
        scores = np.array(good[i]["scores"])
        ids = np.argsort(-scores, kind="stable")[:5].tolist()  # the 4 classes of the tiny model
        assert r["top_class_ids"] == ids and r["top_class_names"] == [names[c] for c in ids]
        np.testing.assert_allclose(r["top_scores"], scores[ids], rtol=1e-6)
        np.testing.assert_allclose(r["top_thresholds"], thresholds[ids], rtol=1e-6)
        assert r["label_names"] == good[i]["label_names"] and r["uncertainty"] == pytest.approx(u[i], rel=1e-6)
    assert "<html" in (out / "review.html").read_text().lower()
    summary = json.loads((out / "_SUCCESS").read_text())
    assert summary["review"] == {"images": 3, "file": str(out / "review.parquet"), "page": str(out / "review.html")}
    assert "uncertainty" in summary["columns"]

    written = (out / "review.parquet").read_bytes()
    assert _label(tiny_model, str(source), str(out), "Label.shard_size=4", "Label.review=3") == 0  # labels nothing
    assert (out / "review.parquet").read_bytes() == written
    capsys.readouterr()
    assert _label(tiny_model, str(source), str(out), "Label.shard_size=4") == 1  # rows with and without uncertainty
    assert "whether Label.review > 0 (the uncertainty column) True there, False now" in capsys.readouterr().err

    plain = tmp_path / "plain"
    assert _label(tiny_model, str(_images(tmp_path / "two", 2)), str(plain), "Label.review=0") == 0
    assert not list(plain.glob("review.*")) and "uncertainty" not in _table(str(plain)).column_names
    assert "review" not in json.loads((plain / "_SUCCESS").read_text())
