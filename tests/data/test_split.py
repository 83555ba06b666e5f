"""Split: iterative stratification keeps every class's val share close to the whole set's; nothing is lost or moved."""

import random
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from mlcls_ray import storage
from mlcls_ray.data.mlcls_format import read_dataset
from mlcls_ray.data.parquet_lists import write_parquet_list
from mlcls_ray.data.split import iterative_stratification, split_dataset, split_sizes
from mlcls_ray.data.synthetic import generate
from tests.helpers import failing_move_onto

TOLERANCE = 0.02  # |val positive rate - whole-set positive rate| per class with >= 20 positives


def imbalanced_labels(n=3000, c=12, seed=0):
    rng = np.random.default_rng(seed)
    rates = np.geomspace(0.4, 0.01, c)  # 1200 positives down to ~30
    return (rng.random((n, c)) < rates).astype(np.uint8)


def stratify(y, sizes, seed=0):
    rows, ids = np.nonzero(y)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(y)))])
    return iterative_stratification(offsets, ids.astype(np.uint16), y.shape[1], sizes, seed)


def test_each_class_keeps_its_rate_in_val():
    y = imbalanced_labels()
    val = stratify(y, (2400, 600)) == 1
    assert val.sum() == 600
    overall, in_val = y.mean(axis=0), y[val].mean(axis=0)
    assert np.abs(in_val - overall).max() < TOLERANCE
    # images with no label are spread too, not dumped into one side
    empty = y.sum(axis=1) == 0
    assert abs(val[empty].mean() - 0.2) < 0.05


def test_it_beats_a_random_split_on_the_rare_classes():
    y = imbalanced_labels(seed=1)
    val = stratify(y, (2400, 600)) == 1
    shuffled = np.random.default_rng(1).permutation(len(y)) < 600
    gap = lambda mask: np.abs(y[mask].mean(axis=0) - y.mean(axis=0))[-4:].max()  # noqa: E731 - the 4 rarest
    assert gap(val) < gap(shuffled) / 2


def test_a_rare_class_lands_in_both_splits():
    y = np.zeros((100, 2), dtype=np.uint8)
    y[:5, 1] = 1  # 5 positives: 4 train, 1 val
    val = stratify(y, (80, 20), seed=3) == 1
    assert y[val, 1].sum() == 1


def test_sizes_follow_paddlex_round_for_every_small_n_and_percent():
    """PaddleX: ``train = round(N * train_rate / 100)`` with Python's round; val gets the rest."""
    for n in range(1, 400):
        for pct in range(1, 100):
            assert split_sizes(n, pct) == (round(n * pct / 100), n - round(n * pct / 100)), (n, pct)
    assert split_sizes(45, 70) == (32, 13)  # 31.5 rounds half to even; floor(0.7 * 45 + 0.5) gave 31


@pytest.mark.parametrize("n, c, sizes", [(1000, 50, (990, 10)), (2001, 80, (1401, 600)), (7, 3, (4, 3)),
                                         (300, 1000, (240, 60))])
def test_sizes_are_exact_for_any_shape(n, c, sizes):
    assigned = stratify(imbalanced_labels(n, c, seed=n), sizes)
    assert np.bincount(assigned, minlength=2).tolist() == list(sizes)


def test_seed_makes_it_reproducible_and_changes_it():
    y = imbalanced_labels(500)
    a, b, c = (stratify(y, (350, 150), seed=s) for s in (1, 1, 2))
    assert (a == b).all() and not (a == c).all()


@pytest.fixture
def demo(tmp_path):
    return generate(tmp_path / "ds", 300, seed=1)


def pooled(root):
    return Counter((root / "train.txt").read_text().splitlines() + (root / "val.txt").read_text().splitlines())


def split(root, pct=70, seed=0):
    problems = []
    done = split_dataset(str(root), pct, seed, problems)
    return done, problems


def test_split_loses_and_duplicates_nothing_and_backs_up(demo):
    before_train, before_val = (demo / "train.txt").read_text(), (demo / "val.txt").read_text()
    before = pooled(demo)
    assert split(demo) == (True, [])
    assert pooled(demo) == before  # same lines, verbatim, each once
    assert len((demo / "val.txt").read_text().splitlines()) == 90
    assert (demo / "train.txt.bak").read_text() == before_train
    assert (demo / "val.txt.bak").read_text() == before_val


def test_a_repeated_split_changes_nothing(demo):
    """Two identical runs (a re-run `make demo`, a retried RayJob) must not move val images into train."""
    assert split(demo, 80) == (True, [])
    first = {name: (demo / name).read_bytes() for name in ("train.txt", "val.txt")}
    assert split(demo, 80) == (True, [])
    assert {name: (demo / name).read_bytes() for name in ("train.txt", "val.txt")} == first
    assert not (demo / "train.txt.bak.1").exists()  # nothing was replaced, so nothing piled up


def test_the_partition_depends_on_the_lines_not_their_order(tmp_path):
    roots = [generate(tmp_path / name, 200, seed=5) for name in ("a", "b")]
    lines = (roots[1] / "train.txt").read_text().splitlines() + (roots[1] / "val.txt").read_text().splitlines()
    random.Random(0).shuffle(lines)
    (roots[1] / "train.txt").write_text("\n".join(lines[:50]) + "\n")  # the same lines, dealt differently
    (roots[1] / "val.txt").write_text("\n".join(lines[50:]) + "\n")
    for root in roots:
        assert split(root, 80, seed=7) == (True, [])
    for name in ("train.txt", "val.txt"):
        assert sorted((roots[0] / name).read_text().splitlines()) == sorted((roots[1] / name).read_text().splitlines())


def parquet_rows(path):
    table = pq.read_table(path)
    return list(zip(table.column("path").to_pylist(), table.column("labels").to_pylist()))


def test_parquet_lists_split_into_parquet_lists_as_the_text_ones_do(demo, tmp_path):
    """The same images as Parquet lists get the same split, row for row, and a repeated split rewrites nothing."""
    other = tmp_path / "parquet"
    other.mkdir()
    (other / "label.txt").write_bytes((demo / "label.txt").read_bytes())
    _, manifest = read_dataset(str(demo), [])
    for index, name in enumerate(manifest.files):
        rows = np.flatnonzero(manifest.file == index)
        write_parquet_list(str(other / name.replace(".txt", ".parquet")), manifest.paths.take(rows),
                           *manifest.label_ids(rows))
    assert split(demo, 80) == (True, []) and split(other, 80) == (True, [])
    for name in ("train", "val"):
        text = [line.split("\t") for line in (demo / f"{name}.txt").read_text().splitlines()]
        assert parquet_rows(other / f"{name}.parquet") == [
            (path, [i for i, v in enumerate(vector.split(",")) if v == "1"]) for path, vector in text]
    first = {name: (other / name).read_bytes() for name in ("train.parquet", "val.parquet")}
    assert split(other, 80) == (True, [])
    assert {name: (other / name).read_bytes() for name in first} == first
    assert not (other / "train.parquet.bak.1").exists() and not (other / "train.txt").exists()


def test_a_failure_between_the_two_lists_leaves_the_old_lists(demo, monkeypatch):
    """Replacing train.txt and then failing on val.txt must not leave a new train.txt beside the old val.txt."""
    before = {name: (demo / name).read_bytes() for name in ("train.txt", "val.txt")}
    monkeypatch.setattr(storage, "_move", failing_move_onto("val.txt"))
    with pytest.raises(storage.StorageError, match="every file was put back as it was"):
        split(demo)
    assert {name: (demo / name).read_bytes() for name in ("train.txt", "val.txt")} == before
    assert sorted(p.name for p in demo.iterdir() if p.is_file()) == ["label.txt", "train.txt", "val.txt"]


def test_a_failure_while_writing_leaves_the_old_lists(demo, monkeypatch):
    before = {name: (demo / name).read_bytes() for name in ("train.txt", "val.txt")}
    real_open = storage.open_output

    def failing_open(uri):
        if "val.txt" in uri:
            raise storage.StorageError(f"{uri}: injected failure (disk full)")
        return real_open(uri)

    monkeypatch.setattr(storage, "open_output", failing_open)
    with pytest.raises(storage.StorageError, match="disk full"):
        split(demo)
    assert {name: (demo / name).read_bytes() for name in ("train.txt", "val.txt")} == before
    assert sorted(p.name for p in demo.iterdir() if p.is_file()) == ["label.txt", "train.txt", "val.txt"]


def test_split_refuses_a_broken_list_and_writes_nothing(demo):
    with open(demo / "val.txt", "a") as f:
        f.write("images/000001.jpg\t1,0\n")
    before = pooled(demo)
    done, problems = split(demo, 80)
    assert not done and [p.kind for p in problems] == ["split_skipped"]
    assert "fix the 1 problem(s) in val.txt first" in problems[0].reason
    assert pooled(demo) == before and not (demo / "train.txt.bak").exists()


def test_everything_in_train_and_an_empty_or_missing_val_is_split(demo):
    lines = (demo / "train.txt").read_text() + (demo / "val.txt").read_text()
    (demo / "train.txt").write_text(lines)
    (demo / "val.txt").write_text("")
    assert split(demo, 80) == (True, [])
    assert len((demo / "val.txt").read_text().splitlines()) == 60
    assert pooled(demo) == Counter(lines.splitlines())
    remaining = (demo / "train.txt").read_text().splitlines()
    (demo / "val.txt").unlink()
    assert split(demo, 80) == (True, [])
    assert pooled(demo) == Counter(remaining) and len((demo / "val.txt").read_text().splitlines()) == 48


def test_nothing_to_split_is_said_plainly(tmp_path):
    root = generate(tmp_path / "ds", 20, seed=0)
    (root / "train.txt").write_text("")
    (root / "val.txt").unlink()
    done, problems = split(root, 80)
    assert not done and [p.reason for p in problems] == ["train.txt and val.txt list no images to split"]
