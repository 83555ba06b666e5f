"""A multi-node Ray cluster on loopback for tests: one ``ray start --block`` process per node, each in its own
session, with its own ports; jobs go through the Jobs API as a user's would. It stops only the processes it
started (each node's process tree, by id) and never runs ``ray stop``, which would kill every Ray on the machine.

The cluster has its own auth token, given to its nodes and to the ``ray`` CLI through ``RAY_AUTH_TOKEN``; the test
process reads job status and state over the dashboard's HTTP API with that token, so it never loads a token into
its own Ray client, which the session's local Ray uses."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import psutil

from tests.helpers import free_port

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
# the GCS declares a lost node dead after about 3 s instead of about 20 s, so a node-loss test waits less
FAST_NODE_DEATH = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
                   "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}



class LocalCluster:
    """A head and worker nodes as separate process trees; ``address`` is the dashboard's (Jobs API) URL."""

    def __init__(self, temp_dir: Path, head_cpus: int) -> None:
        self.temp_dir = temp_dir  # short: Ray's Unix socket paths must fit in 107 bytes
        self.gcs = f"127.0.0.1:{free_port()}"
        self.address = f"http://127.0.0.1:{free_port()}"
        self.token = secrets.token_hex(32)
        self.env = {**os.environ, **FAST_NODE_DEATH, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                    "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}
        self.nodes: list[subprocess.Popen] = []
        self._start(["--head", f"--port={self.gcs.rsplit(':', 1)[1]}", f"--temp-dir={temp_dir}",
                     "--dashboard-host=127.0.0.1", f"--dashboard-port={self.address.rsplit(':', 1)[1]}",
                     f"--ray-client-server-port={free_port()}"], head_cpus)

    def _start(self, args: list[str], cpus: int) -> subprocess.Popen:
        ports = [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                 f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                 f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
        log = open(self.temp_dir / f"node-{len(self.nodes)}.log", "wb")
        node = subprocess.Popen([RAY, "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}",
                                 "--object-store-memory=150000000", "--disable-usage-stats", *ports, *args],
                                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.nodes.append(node)
        return node

    def add_worker(self, cpus: int) -> subprocess.Popen:
        """A worker node with its own temp dir, as on its own machine. Nodes sharing the head's share its
        runtime_resources: a training worker restarted as a node joined was seen to find its job package gone, and
        its raylet waited the 60 s worker registration timeout."""
        own = self.temp_dir / f"n{len(self.nodes)}"
        return self._start([f"--address={self.gcs}", f"--temp-dir={own}"], cpus)

    def get(self, path: str, **query) -> dict:
        """A GET of the dashboard's HTTP API (Jobs and state) with the cluster's token."""
        url = f"{self.address}{path}" + (f"?{urllib.parse.urlencode(query, doseq=True)}" if query else "")
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def _state(self, kind: str, **filters: str) -> list[dict]:
        query = {"limit": 10_000, "detail": 1, "filter_keys": list(filters), "filter_predicates": ["="] * len(filters),
                 "filter_values": list(filters.values())}
        return self.get(f"/api/v0/{kind}", **query)["data"]["result"]["result"]

    def alive_nodes(self) -> list[dict]:
        try:
            return self._state("nodes", state="ALIVE")
        except OSError:  # the dashboard is still starting
            return []

    def wait_for_nodes(self, count: int, timeout: float = 120) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            nodes = self.alive_nodes()
            if len(nodes) == count:
                return nodes
            dead = [i for i, n in enumerate(self.nodes) if n.poll() is not None]
            assert not dead, f"node {dead[0]} exited while starting:\n{self.log(dead[0])}"
            time.sleep(0.5)
        raise TimeoutError(f"{count} nodes were not alive after {timeout:.0f} s:\n{self.log(len(self.nodes) - 1)}")

    def log(self, node: int, tail: int = 3000) -> str:
        return (self.temp_dir / f"node-{node}.log").read_text(errors="replace")[-tail:]

    def submit(self, script: str, *args: str, env_vars: dict[str, str], submission_id: str) -> None:
        """``ray job submit --working-dir <repo> --no-wait -- python jobs/<script> ...``, as the README says."""
        runtime_env = {"env_vars": env_vars}
        subprocess.run([RAY, "job", "submit", f"--address={self.address}", f"--working-dir={REPO}",
                        f"--runtime-env-json={json.dumps(runtime_env)}", f"--submission-id={submission_id}",
                        "--no-wait", "--", "python", f"jobs/{script}", *args],
                       env=self.env, check=True, capture_output=True, timeout=120)

    def wait_for_job(self, submission_id: str, timeout: float = 300) -> tuple[str, str]:
        """The job's final status and its logs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.get(f"/api/jobs/{submission_id}")["status"]
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(1)
        else:
            status = "TIMEOUT"
        return status, self.get(f"/api/jobs/{submission_id}/logs")["logs"]

    def actors(self, class_prefix: str) -> list[dict]:
        """Every actor (alive or dead) whose class name starts with ``class_prefix``, from the state API."""
        return [a for a in self._state("actors") if a["class_name"].startswith(class_prefix)]

    @staticmethod
    def kill(node: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        """Signal a node's whole process tree: the ``ray start`` process, its raylet and the workers under it."""
        try:
            root = psutil.Process(node.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for proc in tree:
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        try:
            os.killpg(node.pid, sig)  # anything reparented away from the tree but still in the node's session
        except ProcessLookupError:
            pass

    def shutdown(self) -> None:
        for node in reversed(self.nodes):
            self.kill(node, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for node in self.nodes:
            try:
                node.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for node in self.nodes:
            self.kill(node)
            node.wait()
