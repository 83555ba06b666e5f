"""Serving benchmark (not a test): requests/s and latency of the Serve endpoint on CPU, with and without batching.

    .venv/bin/python jobs/bench_serve.py [--model resnet18_ML] [--size 64] [--requests 400] [--batch 16] [--smoke]

It saves a model folder of random weights itself (a timm preset built at ``--size`` px, resnet18_ML at 64 px by
default; scores are meaningless, the work per image is real), starts the app on a local Ray exactly as
``Global.mode=serve`` does, then sends the same JPEGs over HTTP on 127.0.0.1 from threads, one ``requests.Session``
each, in three runs on the same replica:

- 1 client: every batch holds one image (latency without load);
- 16 clients with ``max_batch_size=1``: the baseline, the same load with batching off;
- 16 clients with ``max_batch_size=--batch``: ours, batching at work.

Only the deployment's ``user_config`` changes between the runs, so the replica and its model stay the same. The
ratio of ours to the baseline is what batching gains (target >= 2); ``--smoke`` runs a few requests of each to show
the script works.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from mlcls_ray import model_dir  # noqa: E402
from mlcls_ray.config import load_config  # noqa: E402
from mlcls_ray.infer import serve as srv
from mlcls_ray.infer import serve_settings as sets  # noqa: E402
from mlcls_ray.models.zoo import build_model  # noqa: E402
from mlcls_ray.train.run import model_spec  # noqa: E402


def _save_model(folder: str, name: str, size: int) -> str:
    import torch

    spec = model_spec(load_config(name, [f"Train.image_size={size}"], check_paths=False), num_classes=20)
    torch.manual_seed(0)
    model, _ = build_model(spec)
    model_dir.save(folder, spec, model.state_dict(), [f"class_{i}" for i in range(20)], [0.5] * 20)
    return folder


def _images(n: int) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def _run(url: str, images: list[str], clients: int, total: int) -> dict:
    """``total`` requests spread over ``clients`` threads -> requests/s and latency percentiles (ms)."""

    def client(k: int) -> list[float]:
        session, latencies = requests.Session(), []
        for i in range(k, total, clients):
            t0 = time.perf_counter()
            resp = session.post(url, json={"image": images[i % len(images)]}, timeout=60)
            latencies.append(time.perf_counter() - t0)
            assert resp.status_code == 200, resp.text
        return latencies

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = np.array([x for part in pool.map(client, range(clients)) for x in part]) * 1000
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests": total, "rps": total / wall, "p50": float(np.percentile(latencies, 50)),
            "p99": float(np.percentile(latencies, 99))}


def _app(settings: sets.ServeSettings, batch: int):
    """The app with ``batch`` as its max batch size: only ``user_config`` differs, so a redeploy reconfigures the
    running replica in place (same process, same model)."""
    options = sets.deployment_options(settings)
    options["user_config"] = {**options["user_config"], "max_batch_size": batch}
    return srv.MultiLabelClassifier.options(**options).bind(settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18_ML", help="a preset or <timm_name>_ML, random weights")
    parser.add_argument("--size", type=int, default=64, help="input size the model folder is saved at")
    parser.add_argument("--requests", type=int, default=400, help="requests per run (after a warm-up)")
    parser.add_argument("--batch", type=int, default=16, help="Serve.max_batch_size")
    parser.add_argument("--wait", type=float, default=0.05, help="Serve.batch_wait_timeout_s (the presets' default)")
    parser.add_argument("--smoke", action="store_true", help="32 requests a run, at 32 px: does it work, not how fast")
    args = parser.parse_args()
    if args.smoke:
        args.requests, args.size = 32, 32

    import ray
    from ray import serve

    ray.init(logging_level="ERROR", include_dashboard=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        folder = _save_model(os.path.join(tmp, "model"), args.model, args.size)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = sets.ServeSettings.from_args({"model_dir": folder, "max_batch_size": args.batch,
                                                "batch_wait_timeout_s": args.wait})
        url = f"http://127.0.0.1:{port}{srv.ROUTE}"
        images = _images(32)
        runs, sizes = {}, {}
        for name, clients, batch in (("1 client", 1, args.batch), ("baseline", 16, 1), ("ours", 16, args.batch)):
            handle = serve.run(_app(settings, batch), name="bench", route_prefix="/")
            _run(url, images, 4, 48)  # warm-up: threads, allocator, first batches at this setting
            seen = len(handle.stats.remote().result()["batch_sizes"])
            runs[name] = _run(url, images, clients, args.requests)
            sizes[name] = handle.stats.remote().result()["batch_sizes"][seen:]
        serve.shutdown()
    ray.shutdown()

    print(f"\nmodel {args.model} at {args.size} px, random weights; 320x240 JPEGs; batch_wait_timeout_s {args.wait}; "
          f"{os.cpu_count()} CPU cores")
    print(f"{'':12}{'clients':>8}{'max batch':>10}{'mean batch':>11}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for name, r in runs.items():
        batch = 1 if name == "baseline" else args.batch
        print(f"{name:12}{r['clients']:>8}{batch:>10}{np.mean(sizes[name]):>11.1f}{r['rps']:>10.1f}{r['p50']:>10.1f}"
              f"{r['p99']:>10.1f}")
    print(f"batching gain: ours / baseline (16 clients each) {runs['ours']['rps'] / runs['baseline']['rps']:.2f}x "
          f"(target >= 2); ours / 1 client {runs['ours']['rps'] / runs['1 client']['rps']:.2f}x")


if __name__ == "__main__":
    main()
