"""A two-node Ray cluster on loopback (separate ``ray start`` processes), driven through ``ray job submit
--working-dir .`` with data, checkpoints and outputs on S3 (moto): training with one worker per node that loses its
worker node and finishes from its checkpoint on a replacement, then labeling across both nodes."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import uuid
from pathlib import Path

import boto3
import pyarrow.dataset as pads
import pytest

from mlcls_ray import model_dir, storage
from tests.cluster.local_cluster import LocalCluster
from tests.helpers import make_quadrants, upload_tree, write_image

# 3 logical CPUs a node: one training worker (2 CPUs) per node, and 1 left on each for Ray Data's decoding
_NODE_CPUS = 3
_TRAIN = ["-c", "test_resnet_ML", "-o", "Global.device=cpu", "-o", "Train.num_workers=2",
          "-o", "Train.cpus_per_worker=2", "-o", "Train.image_size=32", "-o", "Train.batch_size=16",
          "-o", "Train.learning_rate=0.003", "-o", "Train.warmup_steps=0", "-o", "Train.augment=None",
          "-o", "Train.pretrain_weight_path=None", "-o", "Train.log_interval=2",
          "-o", "Arch.embed_dim=64", "-o", "Arch.ffn_dim=128", "-o", "Arch.num_heads=2"]


@pytest.fixture(scope="module")
def cluster(s3_server):
    with tempfile.TemporaryDirectory(prefix="rc-", dir="/tmp") as temp:
        cluster = LocalCluster(Path(temp), head_cpus=_NODE_CPUS)
        try:
            cluster.add_worker(_NODE_CPUS)
            cluster.wait_for_nodes(2)
            yield cluster
        finally:
            cluster.shutdown()


@pytest.fixture(scope="module")
def bucket(s3_server, tmp_path_factory) -> str:
    name = f"cluster-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=name)
    data = make_quadrants(tmp_path_factory.mktemp("data") / "quadrants", num_train=128, num_val=64)
    upload_tree(data, f"s3://{name}/data")
    return f"s3://{name}"


def _job_env() -> dict[str, str]:
    """What a user passes in ``--runtime-env-json``: the S3 endpoint and keys, and time for a node to join."""
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    return {**env, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "120"}


def _run(cluster: LocalCluster, script: str, *args: str, timeout: float = 300) -> str:
    job = f"{Path(script).stem}-{uuid.uuid4().hex[:8]}"
    cluster.submit(script, *args, env_vars=_job_env(), submission_id=job)
    status, logs = cluster.wait_for_job(job, timeout)
    assert status == "SUCCEEDED", f"{job}: {status}\n{logs[-4000:]}"
    return logs


@pytest.fixture(scope="module")
def trained(cluster, bucket) -> dict:
    """A training job with a worker on each node, whose worker node is killed once the first epoch's checkpoint is
    registered; a replacement node joins, and ``Train.max_failures=1`` lets the run go on."""
    out = f"{bucket}/runs/two-nodes"
    job = f"train-{uuid.uuid4().hex[:8]}"
    cluster.submit("train.py", *_TRAIN, "-o", f"Global.dataset_dir={bucket}/data", "-o", f"Global.output={out}",
                   "-o", "Train.epochs_iters=3", "-o", "Train.max_failures=1", env_vars=_job_env(), submission_id=job)

    # Ray registers a reported checkpoint asynchronously; its run snapshot naming one means it was registered
    deadline = time.monotonic() + 240
    snapshot = None
    while time.monotonic() < deadline and not (snapshot and "epoch_1" in storage.read_text(snapshot)):
        time.sleep(0.2)
        snapshot = next((u for u in storage.iter_files(f"{out}/checkpoints")
                         if u.endswith("checkpoint_manager_snapshot.json")), None)
    assert snapshot, "no checkpoint was registered in time"
    first_group = {w["node_id"] for w in cluster.actors("RayTrainWorker") if w["state"] == "ALIVE"}
    lost = cluster.nodes[-1]
    cluster.kill(lost)  # the worker node's raylet, object store and training worker, all at once
    lost.wait()
    cluster.add_worker(_NODE_CPUS)
    status, logs = cluster.wait_for_job(job, timeout=300)
    assert status == "SUCCEEDED", f"{status}\n{logs[-4000:]}"
    return {"output": out, "logs": logs, "first_group": first_group,
            "all_groups": {w["node_id"] for w in cluster.actors("RayTrainWorker")}}


def test_a_submitted_training_job_runs_one_worker_on_each_node_and_writes_to_s3(trained):
    out = trained["output"]
    assert "Training finished: best val mAP" in trained["logs"]
    result = json.loads(storage.read_text(f"{out}/train_result.json"))
    assert result["done_flag"] is True and result["models"]["best"]["epoch"] in (1, 2, 3)
    for name in ("model.safetensors", "inference.yml"):
        assert storage.exists(f"{out}/best_model/{name}"), name
    assert storage.exists(f"{out}/{result['models']['last_1']['checkpoint']}/state.pt")
    info = model_dir.read_info(f"{out}/best_model")
    assert info.label_names == ["top_left", "top_right", "bottom_left", "bottom_right"]
    assert len(info.thresholds) == 4 and all(math.isfinite(t) for t in info.thresholds)
    assert storage.exists(f"{out}/train.log") and storage.exists(f"{out}/curves.png")
    assert len(trained["first_group"]) == 2, trained  # the two DDP ranks ran on different nodes


def test_losing_the_worker_node_resumes_from_the_checkpoint_on_a_replacement_node(trained):
    log = storage.read_text(f"{trained['output']}/train.log")
    restart = log.index("resumed from its latest checkpoint")
    assert "[Train][Epoch 3/3][Avg]" in log[restart:]
    assert "[Train][Epoch 1/3]" not in log[restart:]  # it went on from a saved epoch, not from scratch
    assert len(trained["all_groups"] - trained["first_group"]) == 1  # the restarted group used the new node


def test_a_submitted_label_job_labels_an_s3_prefix_on_both_nodes(cluster, bucket, trained, tmp_path):
    """Labeling with the model trained above, an inference actor on each node."""
    for i in range(40):
        write_image(tmp_path / "images" / f"{i:03d}.jpg", size=(48, 40), color=(i * 5, 120, 60))
    (tmp_path / "images" / "broken.jpg").write_bytes(b"not a jpeg")
    upload_tree(tmp_path / "images", f"{bucket}/unlabeled")
    out = f"{bucket}/labels"
    logs = _run(cluster, "label.py", "-c", "test_resnet_ML", "-o", "Global.device=cpu",
                "-o", f"Label.model_dir={trained['output']}/best_model", "-o", f"Label.input={bucket}/unlabeled",
                "-o", f"Label.output={out}", "-o", "Label.concurrency=2", "-o", "Label.batch_size=4",
                "-o", "Label.shard_size=8")
    assert "[Label] done: 41 images" in logs
    summary = json.loads(storage.read_text(f"{out}/_SUCCESS"))
    assert summary["images"] == 41 and summary["failed_by_kind"] == {"not_an_image": 1}, summary
    fs, root = storage.resolve(out)
    rows = pads.dataset(root, filesystem=fs, format="parquet").to_table().to_pylist()
    assert len(rows) == len({r["path"] for r in rows}) == 41
    assert [r["error_kind"] for r in rows if r["error"]] == ["not_an_image"]
    scorers = cluster.actors("MapWorker")  # only labeling runs an actor pool on this cluster
    assert len({a["node_id"] for a in scorers}) == 2, scorers  # the inference actors ran on both nodes
