"""Benchmark: listing an ``s3://`` prefix for ``Global.mode=label``, Ray tasks against the sequential paginator.

    python jobs/bench_listing.py                          # 200k keys in 200 folders of 1,000, 2 CPUs for Ray
    python jobs/bench_listing.py --latency-ms 100         # each request answered 100 ms late, as S3 is
    python jobs/bench_listing.py --keys 50000 --folders 50 --cpus 4

An S3-compatible server (moto's app on werkzeug's threaded server, as the tests' ThreadedMotoServer runs it) runs in
a process of its own, so neither side shares its interpreter with the server. The keys
(``images/<parent>/<folder>/<n>.jpg``, 100 folders a parent) are put straight into the server's store: 200k PUT
requests would take longer than the listing. Both sides then list over
HTTP: the baseline is ``storage.iter_files``, the one boto3 paginator the label job used on the driver (1,000 keys
a request); ours is :func:`mlcls_ray.infer.listing.list_prefix`, Ray tasks fanned out over the sub-prefixes, timed
twice: cold (its first run starts Ray's worker processes, each importing boto3 and pyarrow: seconds each on a loaded
machine, once per cluster) and warm. Both sides must give the same keys in the same order.

moto is not S3: for each request it scans every key of the bucket and sorts all those under the request's prefix,
on one Python process. The paginator asks for the whole prefix page after page, so each of its pages sorts all 200k
keys, where a sub-prefix's page sorts 1,000: on moto that alone makes the paginator several times slower, a cost S3
does not have (it answers a page in a steady round trip, tens to a hundred-odd ms, whatever the bucket). Read the
ratio with that in mind. ``--latency-ms`` makes the server answer each request that much later (a sleep, which holds
no CPU), the regime of S3: the paginator waits out one round trip per page, the tasks overlap theirs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_SERVER = """
import sys, threading, time
from moto.core import DEFAULT_ACCOUNT_ID
from moto.s3.models import s3_backends
from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server

port, keys, folders, latency = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]) / 1000
app = DomainDispatcherApplication(create_backend_app)

def answer(environ, start_response):
    time.sleep(latency)
    return app(environ, start_response)

threading.Thread(target=make_server("127.0.0.1", port, answer, threaded=True).serve_forever, daemon=True).start()
backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
backend.create_bucket("bench", "us-east-1")
per = keys // folders
for i in range(keys):
    f = i // per
    backend.put_object("bench", f"images/{f // 100:03d}/{f % 100:02d}/{i:08d}.jpg", b"x" * (1 + i % 97))
print("ready", flush=True)
sys.stdin.read()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=200_000)
    parser.add_argument("--folders", type=int, default=200)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs for the local Ray (listing tasks take 0.25 each)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added to each request's answer")
    args = parser.parse_args()

    from tests.helpers import free_port

    port = free_port()
    started = time.monotonic()
    server = subprocess.Popen([sys.executable, "-c", _SERVER, str(port), str(args.keys), str(args.folders),
                               str(args.latency_ms)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError("the S3 server did not start")
        print(f"{args.keys:,} keys in {args.folders:,} folders put in {time.monotonic() - started:.0f} s; "
              f"{args.latency_ms:g} ms added to each request")
        os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1",
                           "AWS_EC2_METADATA_DISABLED": "true"})
        run(args)
    finally:
        server.stdin.close()
        server.wait()


def run(args: argparse.Namespace) -> None:
    import ray

    from mlcls_ray import storage
    from mlcls_ray.infer import listing
    from mlcls_ray.infer.inputs import is_image

    prefix = "s3://bench/images"
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR")
    seconds = []
    for _ in ("cold", "warm"):
        t = time.monotonic()
        runs = listing.list_prefix(prefix, 10)
        seconds.append(time.monotonic() - t)
    cold_s, ours_s = seconds
    tables = ray.get([r.table for r in runs])
    ours = [p for table, r in zip(tables, runs) for p in table["path"].slice(r.start, r.rows).to_pylist()]

    t = time.monotonic()
    base = [u.encode() for u in storage.iter_files(prefix) if is_image(u)]
    base_s = time.monotonic() - t

    assert ours == base, "the parallel listing differs from the paginator's"
    print(f"sequential paginator (driver): {len(base):,} keys in {base_s:.1f} s = {len(base) / base_s:,.0f} keys/s")
    print(f"parallel listing (Ray tasks, {args.cpus} CPUs): {len(ours):,} keys in {ours_s:.1f} s = "
          f"{len(ours) / ours_s:,.0f} keys/s (cold, starting the workers: {cold_s:.1f} s)")
    print(f"ratio: {base_s / ours_s:.2f}x (same keys, same order)")


if __name__ == "__main__":
    main()
