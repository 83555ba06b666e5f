"""Label's device and cluster setup: which files its CPU tasks decode for a GPU, actors that leave CPUs to decoding,
and tasks that reach S3 with their own credentials, never the driver's."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import ray
from PIL import Image
from ray.util.state import list_tasks

from mlcls_ray.cli import main
from mlcls_ray.data.images import DEFAULT_MAX_PIXELS
from mlcls_ray.infer.actors import inference_actors
from mlcls_ray.infer.label import _Labeler, _load
from mlcls_ray.infer.predictor import decode_square
from tests.helpers import write_image

_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def _save(path: Path, fmt: str, mode: str = "RGB", seed: int = 0, rotation: int | None = None) -> str:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (50, 80, 3), dtype=np.uint8)).convert(mode)
    exif = Image.Exif()
    if rotation:
        exif[0x0112] = rotation
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90, "exif": exif.tobytes()} if fmt == "JPEG" else {}))
    path.write_bytes(buf.getvalue())
    return str(path)


def test_cpu_tasks_send_a_gpu_plain_jpegs_and_decode_everything_else(tiny_model, tmp_path):
    """On a GPU, ``_load`` passes plain JPEGs on as their bytes and decodes PNG, CMYK and EXIF-rotated files itself;
    the actor (torchvision's CPU decoder standing in for nvJPEG) then labels them as the CPU path does."""
    paths = [_save(tmp_path / "a.jpg", "JPEG"), _save(tmp_path / "grey.jpg", "JPEG", "L", 1),
             _save(tmp_path / "b.png", "PNG", seed=2), _save(tmp_path / "cmyk.jpg", "JPEG", "CMYK", 3),
             _save(tmp_path / "turned.jpg", "JPEG", seed=4, rotation=6), str(tmp_path / "missing.jpg")]
    (tmp_path / "fake.jpg").write_bytes(b"not an image")
    paths.append(str(tmp_path / "fake.jpg"))
    batch = {"shard": np.zeros(len(paths), np.int32), "row": np.arange(len(paths)),
             "path": np.array([p.encode() for p in paths], dtype=object)}  # as the plan holds them

    routed = _load(batch, 32, True, DEFAULT_MAX_PIXELS, 1 << 20)
    assert "image" not in routed and routed["square"].tolist() == [False, False, True, True, True, False, False]
    assert [routed["data"][i] for i in (0, 1)] == [Path(p).read_bytes() for p in paths[:2]]
    for i in (2, 3, 4):  # the decoded square's raw bytes, not the file
        assert routed["data"][i] == decode_square(Path(paths[i]).read_bytes(), 32).tobytes()
    assert routed["error_kind"].tolist() == ["", "", "", "", "", "missing_image", "not_an_image"]

    gpu = _Labeler(tiny_model, "cpu", 1, None, DEFAULT_MAX_PIXELS, device_decode=True)(routed).to_pydict()
    cpu = _Labeler(tiny_model, "cpu", 1, None, DEFAULT_MAX_PIXELS, device_decode=False)(
        _load(batch, 32, False, DEFAULT_MAX_PIXELS, 1 << 20)).to_pydict()
    assert gpu["error_kind"] == cpu["error_kind"] and gpu["scores"][5:] == cpu["scores"][5:] == [None, None]
    assert gpu["scores"][2:5] == cpu["scores"][2:5]  # the same squares, from the same decoder
    np.testing.assert_allclose(gpu["scores"][:2], cpu["scores"][:2], atol=1e-3)  # resized on the "device"


def test_two_cpu_actors_on_two_cpus_finish_and_their_tasks_get_no_credential(ray_start_2_cpus, tiny_model, tmp_path):
    """``Label.concurrency=2`` on a 2-CPU Ray leaves CPUs to the decoding tasks and finishes. The tasks get the S3
    endpoint in their runtime_env but none of the driver's credentials: workers use their node's own (here, the
    session's moto keys, in the environment Ray started with)."""
    assert inference_actors("cpu", 2)["num_cpus"] * 2 <= ray.cluster_resources()["CPU"] / 2
    for i in range(6):
        write_image(tmp_path / "in" / f"{i}.jpg", size=(40, 30), color=(i * 40, 90, 40))
    out = tmp_path / "out"
    settings = ["Global.mode=label", f"Label.model_dir={tiny_model}", f"Label.input={tmp_path / 'in'}",
                f"Label.output={out}", "Global.device=cpu", "Label.batch_size=4", "Label.concurrency=2"]
    assert main(["-c", "test_resnet_ML", *[a for s in settings for a in ("-o", s)]]) == 0
    assert json.loads((out / "_SUCCESS").read_text())["images"] == 6

    deadline, envs = time.monotonic() + 30, _task_envs()
    while not any("compact" in name for name in envs) and time.monotonic() < deadline:
        time.sleep(1)  # Ray reports task events a second or so after the tasks ran
        envs = _task_envs()
    label = [name for name in envs if any(f in name for f in ("_load", "_Labeler", "write_pieces", "compact"))]
    assert any("_load" in name for name in label) and any("compact" in name for name in label), sorted(envs)
    assert all("AWS_ENDPOINT_URL" in envs[name] for name in label if "_load" in name or "compact" in name)
    assert [name for name in label if any(k in envs[name] for k in _SECRETS)] == []  # (training's workers have them)


def _task_envs() -> dict[str, str]:
    """Each task name of this session's job -> its serialized runtime_env, from Ray's state API."""
    context = ray.get_runtime_context()
    tasks = list_tasks(context.gcs_address, filters=[("job_id", "=", context.get_job_id())], detail=True,
                       limit=10_000, raise_on_missing_output=False)
    return {t.name: (t.runtime_env_info or {}).get("serialized_runtime_env", "") for t in tasks}


def test_plain_gpu_is_every_gpu_the_cluster_has_and_gains(ray_start_2_cpus, monkeypatch, capsys):
    """``gpu`` grows with the cluster (up to ``Label.concurrency``); ``gpu:0,1`` stays two. On a cluster (RAY_ADDRESS)
    without GPUs yet, the pool waits for the autoscaler instead of failing."""
    monkeypatch.setenv("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    grows, capped, named = inference_actors("gpu"), inference_actors("gpu", 4), inference_actors("gpu:0,1")
    assert "waiting for the autoscaler to add GPU nodes" in capsys.readouterr().err
    assert (grows["compute"].min_size, grows["compute"].max_size) == (1, float("inf"))
    assert (capped["compute"].min_size, capped["compute"].max_size) == (1, 4)
    assert (named["compute"].min_size, named["compute"].max_size) == (2, 2)
    assert grows["num_gpus"] == 1 and grows["fn_constructor_kwargs"] == {"device": "cuda", "threads": 1}
