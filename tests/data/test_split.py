"""Split: iterative stratification keeps every class's val share close to the whole set's; nothing is lost."""

from collections import Counter

import numpy as np
import pytest

from mlcls_ray.data.split import iterative_stratification, split_dataset
from mlcls_ray.data.synthetic import generate

TOLERANCE = 0.02  # |val positive rate - whole-set positive rate| per class with >= 20 positives


def imbalanced_labels(n=3000, c=12, seed=0):
    rng = np.random.default_rng(seed)
    rates = np.geomspace(0.4, 0.01, c)  # 1200 positives down to ~30
    return (rng.random((n, c)) < rates).astype(np.uint8)


def test_each_class_keeps_its_rate_in_val():
    y = imbalanced_labels()
    val = iterative_stratification(y, (0.8, 0.2), seed=0) == 1
    assert val.sum() == 600  # exactly round(N * 20%), as PaddleX gives
    overall, in_val = y.mean(axis=0), y[val].mean(axis=0)
    assert np.abs(in_val - overall).max() < TOLERANCE
    # images with no label are spread too, not dumped into one side
    empty = y.sum(axis=1) == 0
    assert abs(val[empty].mean() - 0.2) < 0.05


def test_a_rare_class_lands_in_both_splits():
    y = np.zeros((100, 2), dtype=np.uint8)
    y[:5, 1] = 1  # 5 positives: 4 train, 1 val
    val = iterative_stratification(y, (0.8, 0.2), seed=3) == 1
    assert y[val, 1].sum() == 1


@pytest.mark.parametrize("n, c, ratios", [(1000, 50, (0.99, 0.01)), (2001, 80, (0.7, 0.3)), (7, 3, (0.5, 0.5))])
def test_sizes_are_exact_for_any_shape(n, c, ratios):
    y = imbalanced_labels(n, c, seed=n)
    assigned = iterative_stratification(y, ratios, seed=0)
    train = int(np.floor(ratios[0] * n + 0.5))
    assert np.bincount(assigned, minlength=2).tolist() == [train, n - train]


def test_seed_makes_it_reproducible_and_changes_it():
    y = imbalanced_labels(500)
    a, b, c = (iterative_stratification(y, (0.7, 0.3), seed=s) for s in (1, 1, 2))
    assert (a == b).all() and not (a == c).all()


@pytest.fixture
def demo(tmp_path):
    return generate(tmp_path / "ds", 300, seed=1)


def pooled(root):
    return Counter((root / "train.txt").read_text().splitlines() + (root / "val.txt").read_text().splitlines())


def test_split_loses_and_duplicates_nothing_and_backs_up(demo):
    before_train, before_val = (demo / "train.txt").read_text(), (demo / "val.txt").read_text()
    before = pooled(demo)
    assert split_dataset(str(demo), 70, 30, seed=0) == []
    assert pooled(demo) == before  # same lines, verbatim, each once
    assert len((demo / "val.txt").read_text().splitlines()) == 90
    assert (demo / "train.txt.bak").read_text() == before_train
    assert (demo / "val.txt.bak").read_text() == before_val
    split_dataset(str(demo), 70, 30, seed=0)
    assert (demo / "train.txt.bak.1").exists() and (demo / "train.txt.bak").read_text() == before_train


def test_same_input_and_seed_give_byte_identical_files(tmp_path):
    roots = [generate(tmp_path / name, 200, seed=5) for name in ("a", "b")]
    for root in roots:
        assert split_dataset(str(root), 80, 20, seed=7) == []
    for name in ("train.txt", "val.txt"):
        assert (roots[0] / name).read_bytes() == (roots[1] / name).read_bytes()


def test_split_refuses_a_broken_list_and_writes_nothing(demo):
    with open(demo / "val.txt", "a") as f:
        f.write("images/000001.jpg\t1,0\n")
    before = pooled(demo)
    problems = split_dataset(str(demo), 80, 20, seed=0)
    assert [p.kind for p in problems] == ["split_skipped"]
    assert "fix the 1 problem(s) in val.txt first" in problems[0].reason
    assert pooled(demo) == before and not (demo / "train.txt.bak").exists()


def test_everything_in_train_and_an_empty_or_missing_val_is_split(demo):
    lines = (demo / "train.txt").read_text() + (demo / "val.txt").read_text()
    (demo / "train.txt").write_text(lines)
    (demo / "val.txt").write_text("")
    assert split_dataset(str(demo), 80, 20, seed=0) == []
    assert len((demo / "val.txt").read_text().splitlines()) == 60
    assert pooled(demo) == Counter(lines.splitlines())
    remaining = (demo / "train.txt").read_text().splitlines()
    (demo / "val.txt").unlink()
    assert split_dataset(str(demo), 80, 20, seed=0) == []
    assert pooled(demo) == Counter(remaining) and len((demo / "val.txt").read_text().splitlines()) == 48


def test_nothing_to_split_is_said_plainly(tmp_path):
    root = generate(tmp_path / "ds", 20, seed=0)
    (root / "train.txt").write_text("")
    (root / "val.txt").unlink()
    assert [p.reason for p in split_dataset(str(root), 80, 20, seed=0)] == [
        "train.txt and val.txt list no images to split"]
