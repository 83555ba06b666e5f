"""1,000 classes through the sparse path: Parquet lists, CSR manifest, label ids in the stream, class-sharded
validation and evaluate, with the same mAP as the dense path (text lists of 0/1, the whole [N, C] in one process)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlcls_ray.cli import main
from mlcls_ray.data.images import decode_image
from mlcls_ray.data.mlcls_format import format_label_file, format_line, read_dataset
from mlcls_ray.infer.predictor import Predictor
from mlcls_ray.metrics import mean_average_precision
from tests.helpers import make_quadrants

pytestmark = pytest.mark.usefixtures("ray_start_2_cpus")

C = 1000
_SETTINGS = ["Global.device=cpu", "Train.image_size=32", "Train.batch_size=16", "Train.num_workers=2",
             "Train.learning_rate=0.003", "Train.augment=none", "Train.pretrain_weight_path=None",
             "Train.epochs_iters=1", "Train.ema_decay=0", "Arch.embed_dim=64", "Arch.ffn_dim=128", "Arch.num_heads=2"]


def _labels(quadrant_vector: list[int], rng: np.random.Generator) -> list[int]:
    """A quadrant class i is class 250 * i; two more ids from the other 996 make the long tail."""
    ids = {250 * i for i, v in enumerate(quadrant_vector) if v}
    ids.update(int(x) for x in rng.choice([c for c in range(C) if c % 250], 2, replace=False))
    return sorted(ids)


@pytest.fixture(scope="module")
def two_forms(tmp_path_factory) -> tuple[Path, Path]:
    """The same images and labels as Parquet lists (sparse) and as text lists of 1,000 0/1 values (dense)."""
    base = tmp_path_factory.mktemp("many")
    quadrants = make_quadrants(base / "quadrants", num_train=160, num_val=96)
    rng = np.random.default_rng(0)
    sparse, dense = base / "sparse", base / "dense"
    for root in (sparse, dense):
        root.mkdir()
        (root / "images").mkdir()
        for image in (quadrants / "images").iterdir():
            os.link(image, root / "images" / image.name)  # the same files (a symlink out of the root is refused)
        (root / "label.txt").write_text(format_label_file([f"class_{i}" for i in range(C)]))
    for split in ("train", "val"):
        rows = [(path, _labels([int(v) for v in vector.split(",")], rng)) for path, vector in
                (line.split("\t") for line in (quadrants / f"{split}.txt").read_text().splitlines())]
        pq.write_table(pa.table({"path": [p for p, _ in rows],
                                 "labels": pa.array([ids for _, ids in rows], pa.list_(pa.int32()))}),
                       sparse / f"{split}.parquet")
        (dense / f"{split}.txt").write_text("".join(
            format_line(p, [int(c in ids) for c in range(C)]) + "\n" for p, ids in rows))
    return sparse, dense


def _run(mode: str, root: Path, out: Path) -> dict:
    settings = [f"Global.mode={mode}", f"Global.dataset_dir={root}", f"Global.output={out}", *_SETTINGS]
    assert main(["-c", "test_resnet_ML", *[a for s in settings for a in ("-o", s)]]) == 0
    return json.loads((out / f"{mode}_result.json").read_text())


def test_sparse_training_and_evaluate_give_the_dense_map(two_forms, tmp_path):
    sparse, dense = two_forms
    _, val_ids = read_dataset(str(sparse), [], files=("val.txt",))  # val.parquet
    _, val = read_dataset(str(dense), [], files=("val.txt",))
    assert val_ids.files == ("val.parquet",) and len(val) == 96
    assert (val_ids.labels(slice(None)) == val.labels(slice(None))).all()  # the same labels from either form

    best = _run("train", sparse, tmp_path)["models"]["best"]["score"]
    from_ids = _run("evaluate", sparse, tmp_path)["metrics"]["MultiLabelMAP"]

    # the dense reference: every val image's 1,000 scores and labels in one process, today's metric
    predictor = Predictor(str(tmp_path / "best_model"))
    images = [decode_image((dense / p).read_bytes()) for p in val.paths.to_pylist()]
    reference = mean_average_precision(predictor.logits(predictor.preprocess(images)), val.labels(slice(None)))
    assert from_ids == pytest.approx(reference, abs=1e-6)  # evaluate's block tasks
    assert best == pytest.approx(reference, abs=1e-4)  # training's class-sharded validation, on 2 ranks
