"""A lease on a label output: one live run writes into it at a time.

``<output>/_LEASE`` names the run that holds it (a run id, host, process id, start time) and is rewritten by a
thread of the driver every quarter of its time to live. It is created only where there is none (S3's
``If-None-Match: *``, ``O_EXCL`` locally), so of two runs started together one gets it and the other is refused.
A lease not renewed for its time to live (a killed driver, a lost node), or held by a process of this host that
no longer runs (a run killed here, rerun at once), is taken over. Renewing and taking over are conditional on the
version read (S3's ``If-Match``), so two runs never both believe they hold it. The lease is released at the end,
whether the run succeeded or failed.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

from mlcls_ray import storage

__all__ = ["LEASE_FILE", "Lease", "OutputBusyError"]

LEASE_FILE = "_LEASE"
DEFAULT_TTL_S = 120.0  # a lease not renewed for this long is free; renewed every quarter of it
_ATTEMPTS = 3  # races lost in a row (the lease released or taken over while we looked) before giving up


class OutputBusyError(RuntimeError):
    """Another live run holds the output's lease, or this run lost it; the message names that run."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _gone(holder: dict) -> bool:
    """The holder is a process of this host that no longer runs (its lease need not wait for its expiry)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _describe(holder: dict, age: float) -> str:
    if not holder:
        return f"a run that is writing its lease now (renewed {age:.0f} s ago)"
    return (f"run {holder.get('run')} (host {holder.get('host')}, pid {holder.get('pid')}, started "
            f"{holder.get('started')}, lease renewed {age:.0f} s ago, free {holder.get('ttl_s', 0) - age:.0f} s after "
            "that unless renewed)")


class Lease:
    """Hold ``<output>/_LEASE`` for the life of a ``with`` block.

    Args:
        output: the output folder (local or ``s3://``).
        ttl_s: how long the lease stays valid without a renewal.

    Raises:
        OutputBusyError: on entry, when another live run holds it.
    """

    def __init__(self, output: str, ttl_s: float = DEFAULT_TTL_S):
        self.uri = storage.join(output, LEASE_FILE)
        self.ttl_s = ttl_s
        self.run = uuid.uuid4().hex[:12]
        self._info = {"run": self.run, "host": socket.gethostname(), "pid": os.getpid(), "started": _now(),
                      "ttl_s": ttl_s, "renewed": _now(), "renewals": 0}
        self._version: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name="mlcls-lease", daemon=True)

    def _body(self) -> bytes:
        return json.dumps(self._info).encode()

    def __enter__(self) -> Lease:
        for _ in range(_ATTEMPTS):
            self._version = storage.create_new(self.uri, self._body())
            if self._version is not None:
                break
            held = storage.read_versioned(self.uri)
            if held is None:
                continue  # released while we looked
            data, version, age = held
            try:
                holder = json.loads(data)
            except ValueError:  # being written this moment (a local create is one write after O_EXCL)
                holder = {}
            if holder and (age > holder.get("ttl_s", self.ttl_s) or _gone(holder)):
                self._version = storage.replace_if(self.uri, self._body(), version)
                if self._version is not None:
                    print(f"[Label] took over the lease of {_describe(holder, age)}: it had stopped")
                    break
                continue
            raise OutputBusyError(f"{self.uri.rsplit('/', 1)[0]} is being written by {_describe(holder, age)}; "
                                  "wait for it to end, or label into another Label.output")
        else:
            raise OutputBusyError(f"{self.uri}: other runs kept taking this lease; is more than one run starting "
                                  "on this output? Use one Label.output per run")
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.ttl_s / 4):
            self._info["renewed"], self._info["renewals"] = _now(), self._info["renewals"] + 1  # a new ETag each time
            try:
                version = storage.replace_if(self.uri, self._body(), self._version)
            except storage.StorageError as exc:
                if time.monotonic() - last_ok > self.ttl_s:
                    self._lost = f"could not renew it for {self.ttl_s:.0f} s ({exc})"
                    return
                continue  # a passing storage error: the next renewal may get through
            if version is None:
                held = storage.read_versioned(self.uri)
                self._lost = ("another run took it over" if held else "it was deleted") + \
                    f" after {time.monotonic() - last_ok:.0f} s without a renewal"
                return
            self._version, last_ok = version, time.monotonic()

    def check(self) -> None:
        """Raise if the lease was lost: another run may be writing into the output now.

        Raises:
            OutputBusyError: the lease was taken over, deleted, or could not be renewed in time.
        """
        if self._lost:
            raise OutputBusyError(f"{self.uri}: this run (run {self.run}) lost its lease: {self._lost}; stopping "
                                  "so two runs do not write one output")

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if not self._lost and self._version is not None:
            try:
                storage.replace_if(self.uri, None, self._version)
            except storage.StorageError as error:  # never hide the run's own outcome; the lease expires anyway
                print(f"mlcls: could not release {self.uri} ({error}); it expires in {self.ttl_s:.0f} s")
