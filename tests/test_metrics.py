"""Metrics against sklearn: AP and mAP with ties and class chunks, F1-best thresholds, precision / recall / F1."""

import warnings

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score

from mlcls_ray.metrics import average_precision, calibrate_thresholds, mean_average_precision, precision_recall_f1

N, C = 500, 7


def _labels(rng: np.random.Generator, n: int = N, c: int = C) -> np.ndarray:
    return (rng.random((n, c)) < 0.3).astype(np.uint8)


def _scores(kind: str, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Logits that lean towards the labels: continuous, integer (few distinct values) or float16-rounded sigmoid."""
    logits = 1.5 * labels + rng.standard_normal(labels.shape)
    if kind == "integer":
        return np.round(logits).astype(np.float32)
    if kind == "float16":
        return (1 / (1 + np.exp(-4 * logits))).astype(np.float16).astype(np.float32)
    return logits.astype(np.float32)


@pytest.fixture(params=["continuous", "integer", "float16"])
def case(request):
    rng = np.random.default_rng(0)
    labels = _labels(rng)
    return _scores(request.param, labels, rng), labels


def test_ap_and_map_match_sklearn(case):
    scores, labels = case
    np.testing.assert_allclose(average_precision(scores, labels), average_precision_score(labels, scores, average=None),
                               rtol=0, atol=1e-9)
    assert mean_average_precision(scores, labels) == pytest.approx(
        average_precision_score(labels, scores, average="macro"), abs=1e-9)


def test_tied_cases_really_tie(case):
    scores, _ = case
    distinct = min(len(np.unique(scores[:, j])) for j in range(C))
    assert distinct == N or distinct < 0.7 * N  # the tied kinds tie a lot


def test_class_chunks_give_identical_results(case):
    scores, labels = case
    results = [average_precision(scores, labels, chunk_classes=k) for k in (1, 3, C, None)]
    for result in results[1:]:
        np.testing.assert_array_equal(result, results[0])


def test_class_without_positives_is_nan_and_left_out():
    rng = np.random.default_rng(1)
    labels = _labels(rng)
    scores = _scores("float16", labels, rng)
    labels[:, 2] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ap, mean = average_precision(scores, labels), mean_average_precision(scores, labels)
    others = [j for j in range(C) if j != 2]
    assert np.isnan(ap[2]) and not np.isnan(ap[others]).any()
    np.testing.assert_allclose(ap[others], average_precision_score(labels[:, others], scores[:, others], average=None),
                               rtol=0, atol=1e-9)
    assert mean == pytest.approx(average_precision_score(labels[:, others], scores[:, others]), abs=1e-9)


def test_no_positives_anywhere_gives_nan():
    scores = np.random.default_rng(2).random((50, 4), dtype=np.float32)
    empty = np.zeros((50, 4), np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(average_precision(scores, empty)).all()
        assert np.isnan(mean_average_precision(scores, empty))
        assert np.isnan(mean_average_precision(scores[:0], empty[:0]))


def _calibration_case() -> tuple[np.ndarray, np.ndarray]:
    """Columns: float16 ties; no positives; all positive with a 0.0 score; a split between adjacent float32 values
    whose midpoint rounds onto the upper one; continuous; a single positive."""
    rng = np.random.default_rng(3)
    n = 300
    labels = _labels(rng, n, 6)
    probs = _scores("float16", labels, rng)
    probs[:, 4] = _scores("continuous", labels[:, 4:5], rng)[:, 0] / 10 + 0.5
    labels[:, 1] = 0
    labels[:, 2] = 1
    probs[:, 2] = rng.random(n, dtype=np.float32)
    probs[0, 2] = 0.0
    low = np.float32(0.3)
    if low.view(np.uint32) % 2 == 0:  # round-half-to-even must pick the upper of two adjacent floats
        low = np.nextafter(low, np.float32(1))
    high = np.nextafter(low, np.float32(1))
    assert np.float32((np.float64(low) + high) / 2) == high
    probs[:, 3] = np.where(labels[:, 3] == 1, high, low)
    probs[:5, 3] = [0.9, 0.1, 0.2, 0.8, 0.05]
    labels[:, 5] = 0
    labels[7, 5] = 1
    return probs, labels


def test_calibrated_thresholds_reach_the_brute_force_best_f1():
    probs, labels = _calibration_case()
    t = calibrate_thresholds(probs, labels, default=0.25)
    assert t.dtype == np.float32 and t.shape == (6,)
    assert t[1] == np.float32(0.25)
    assert t[2] == np.nextafter(np.float32(0), np.float32(-1))  # every row kept, the 0.0 one included
    for j in (0, 2, 3, 4, 5):
        p, y = probs[:, j], labels[:, j]
        candidates = np.unique(p)[::-1]  # keep every row scoring at least this
        f1 = [f1_score(y, p >= v) for v in candidates]
        best = int(np.argmax(f1))
        assert f1_score(y, p > t[j]) == pytest.approx(f1[best], abs=1e-12)
        np.testing.assert_array_equal(p > t[j], p >= candidates[best])  # exactly the intended rows


def test_calibration_handles_many_class_blocks(monkeypatch):
    import mlcls_ray.metrics as metrics

    probs, labels = _calibration_case()
    expected = calibrate_thresholds(probs, labels)
    monkeypatch.setattr(metrics, "_BLOCK_BYTES", 8 * len(probs) * 2)  # two classes a block
    np.testing.assert_array_equal(calibrate_thresholds(probs, labels), expected)


def _sklearn_prf(probs: np.ndarray, labels: np.ndarray, thresholds) -> dict[str, float]:
    pred = (probs > thresholds).astype(np.uint8)
    seen = labels.sum(axis=0) > 0
    out = {}
    for name, fn in (("precision", precision_score), ("recall", recall_score), ("f1", f1_score)):
        out[f"micro_{name}"] = fn(labels, pred, average="micro", zero_division=0)
        out[f"macro_{name}"] = fn(labels[:, seen], pred[:, seen], average="macro", zero_division=0)
    return out


@pytest.mark.parametrize("per_class", [False, True])
def test_precision_recall_f1_matches_sklearn(per_class):
    rng = np.random.default_rng(4)
    labels = _labels(rng)
    probs = _scores("float16", labels, rng)
    labels[:, 3] = 0  # no positives: counts in micro, left out of macro
    thresholds = 0.5
    if per_class:
        thresholds = rng.uniform(0.2, 0.8, C).astype(np.float32)
        thresholds[5] = 1.0  # nothing predicted: precision 0 / 0 = 0
    expected = _sklearn_prf(probs, labels, thresholds)
    got = precision_recall_f1(probs, labels, thresholds)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    for chunk_rows in (1, 37, N):
        assert precision_recall_f1(probs, labels, thresholds, chunk_rows=chunk_rows) == got


def test_precision_recall_f1_without_positives():
    probs = np.random.default_rng(5).random((20, 3), dtype=np.float32)
    got = precision_recall_f1(probs, np.zeros((20, 3), np.uint8), 0.5)
    assert got["micro_precision"] == got["micro_recall"] == got["micro_f1"] == 0.0
    assert all(np.isnan(got[f"macro_{name}"]) for name in ("precision", "recall", "f1"))


def test_cross_fitted_f1_is_not_fooled_by_thresholds_fit_to_noise():
    """On scores that carry no signal, thresholds calibrated on the same rows still find an F1 well above what
    they give on unseen rows; scored on the other half, they give about what any threshold would."""
    from mlcls_ray.metrics import calibrate_thresholds, cross_fitted_f1, precision_recall_f1

    rng = np.random.default_rng(0)
    probs = rng.random((400, 20)).astype(np.float32)
    labels = (rng.random((400, 20)) < 0.05).astype(np.uint8)
    in_sample = precision_recall_f1(probs, labels, calibrate_thresholds(probs, labels))
    honest = cross_fitted_f1(probs, labels)
    assert in_sample["macro_f1"] > honest["macro_f1"] + 0.03
    assert honest["macro_f1"] < 0.11  # about 2p/(1+p) for p = 5% positives at the best fixed threshold


def test_per_class_ap_equals_sklearn_on_a_subsample_of_a_wide_set():
    """3,000 images x 500 classes of rare labels and float16 ties, as a class block of a 20k-class set: every class
    of a random subsample has sklearn's AP."""
    rng = np.random.default_rng(6)
    labels = (rng.random((3000, 500)) < rng.uniform(0.001, 0.05, 500)).astype(np.uint8)
    scores = _scores("float16", labels, rng)
    ap = average_precision(scores, labels)
    some = rng.choice(np.flatnonzero(labels.any(axis=0)), 25, replace=False)
    np.testing.assert_allclose(ap[some], average_precision_score(labels[:, some], scores[:, some], average=None),
                               rtol=0, atol=1e-9)


def test_class_blocks_concatenate_into_the_whole_result():
    """What a rank or a task computes for its block of classes is exactly the whole matrix's result for them."""
    from mlcls_ray.metrics import class_mean, cross_fitted_counts, prf_counts

    probs, labels = _calibration_case()
    parts = [slice(0, 1), slice(1, 4), slice(4, 6)]
    joined = {
        "ap": np.concatenate([average_precision(probs[:, s], labels[:, s]) for s in parts]),
        "t": np.concatenate([calibrate_thresholds(probs[:, s], labels[:, s]) for s in parts]),
        "counts": np.concatenate([prf_counts(probs[:, s], labels[:, s], 0.5) for s in parts], axis=1),
        "cross": np.concatenate([cross_fitted_counts(probs[:, s], labels[:, s]) for s in parts], axis=1),
    }
    np.testing.assert_array_equal(joined["ap"], average_precision(probs, labels))
    assert class_mean(joined["ap"]) == mean_average_precision(probs, labels)
    np.testing.assert_array_equal(joined["t"], calibrate_thresholds(probs, labels))
    np.testing.assert_array_equal(joined["counts"], prf_counts(probs, labels, 0.5))
    np.testing.assert_array_equal(joined["cross"], cross_fitted_counts(probs, labels))


def test_cross_fitted_f1_keeps_rows_just_above_a_threshold():
    """A class every row of which is positive at one score gets the float32 just below that score as its
    threshold: every row of the other half is predicted (a shift p - t + 0.5 > 0.5 rounds them all away)."""
    from mlcls_ray.metrics import cross_fitted_f1

    probs, labels = np.full((10, 1), 0.4, np.float32), np.ones((10, 1), np.uint8)
    assert cross_fitted_f1(probs, labels)["micro_recall"] == 1.0
