"""The label output's lease, on local disk and on a real S3-compatible server (moto): one live run at a time."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from mlcls_ray import storage
from mlcls_ray.infer.lease import LEASE_FILE, Lease, OutputBusyError


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    return f"{request.getfixturevalue('s3_bucket')}/labels/out"


def test_a_second_live_run_is_refused_until_the_first_ends(output):
    with Lease(output) as first:
        held = json.loads(storage.read_text(storage.join(output, LEASE_FILE)))
        assert held["run"] == first.run and held["pid"] == os.getpid()
        with pytest.raises(OutputBusyError, match=f"is being written by run {first.run} .*another Label.output"):
            Lease(output).__enter__()
    assert not storage.exists(storage.join(output, LEASE_FILE))  # released
    with Lease(output):
        pass


def test_the_lease_is_renewed_and_a_lost_one_stops_the_run(output):
    with Lease(output, ttl_s=2) as lease:  # S3 tells a lease's age to the second: ttl_s is never under a few
        _, version, _ = storage.read_versioned(lease.uri)
        time.sleep(0.7)  # renewed every 0.5 s
        assert storage.read_versioned(lease.uri)[1] != version
        with pytest.raises(OutputBusyError):
            Lease(output).__enter__()
        storage.write_text(lease.uri, json.dumps({"run": "intruder"}))  # written over, as a takeover would
        time.sleep(0.7)
        with pytest.raises(OutputBusyError, match="lost its lease: another run took it over"):
            lease.check()
    assert json.loads(storage.read_text(lease.uri))["run"] == "intruder"  # not released: it is not ours


def test_an_expired_lease_is_taken_over(output):
    storage.write_text(storage.join(output, LEASE_FILE),
                       json.dumps({"run": "gone", "host": "another-host", "pid": 1, "ttl_s": 1}))
    with pytest.raises(OutputBusyError, match="run gone"):
        Lease(output).__enter__()
    time.sleep(2.1)  # S3 tells the age to the second
    with Lease(output) as lease:
        assert json.loads(storage.read_text(lease.uri))["run"] == lease.run


def test_a_killed_run_on_this_host_frees_its_lease_at_once(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    storage.write_text(str(tmp_path / LEASE_FILE), json.dumps({"run": "killed", "host": socket.gethostname(),
                                                                "pid": int(dead.stdout), "ttl_s": 3600}))
    with Lease(str(tmp_path)) as lease:
        assert json.loads((tmp_path / LEASE_FILE).read_text())["run"] == lease.run
