"""What rank 0 tells people while training runs: console lines, ``train.log``, TensorBoard files and ``curves.png``.

Everything is written under ``Global.output`` (local or ``s3://``) at the end of each epoch, and ``train.log`` also
once a minute while lines come, so a run that dies leaves its log up to its last minute. TensorBoard events are
written to a local folder and copied up.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboardX import SummaryWriter  # noqa: E402

from mlcls_ray import storage  # noqa: E402
from mlcls_ray.data.report import figure_png  # noqa: E402

__all__ = ["LOG_FILE", "CURVES_FILE", "TENSORBOARD_DIR", "RunLog", "curves_png", "hms"]

LOG_FILE = "train.log"
CURVES_FILE = "curves.png"
TENSORBOARD_DIR = "tensorboard"
_LOG_EVERY_S = 60  # train.log is rewritten at least this often while lines come, and at every epoch's end


def hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def curves_png(history: list[dict]) -> bytes:
    """Loss, mAP (raw and EMA) and learning rate per epoch."""
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [h["loss"] for h in history], marker="o")
    axes[0].set(title="train loss (sum per batch)", xlabel="epoch")
    evals = [h for h in history if "map_raw" in h]
    axes[1].plot([h["epoch"] for h in evals], [h["map_raw"] for h in evals], marker="o", label="raw")
    if any("map_ema" in h for h in evals):
        axes[1].plot([h["epoch"] for h in evals], [h["map_ema"] for h in evals], marker="s", label="EMA")
    axes[1].set(title="val mAP", xlabel="epoch")
    axes[1].legend()
    axes[2].plot(epochs, [h["lr"] for h in history], marker="o")
    axes[2].set(title="learning rate (end of epoch)", xlabel="epoch", yscale="log")
    fig.tight_layout()
    return figure_png(fig, dpi=90)


class RunLog:
    """Rank 0's log: prints each line and rewrites ``train.log`` (earlier runs' lines kept) once per epoch."""

    def __init__(self, output: str, run_name: str):
        self.output, self.started = output, time.monotonic()
        self._written = self.started
        log_uri = storage.join(output, LOG_FILE)
        self.lines = [storage.read_text(log_uri).rstrip("\n")] if storage.exists(log_uri) else []
        self._tb_local = tempfile.mkdtemp(prefix="mlcls-tb-")
        self._tb_remote = storage.join(output, TENSORBOARD_DIR, run_name)
        self.tb = SummaryWriter(self._tb_local)

    def __call__(self, line: str) -> None:
        stamped = f"[{time.strftime('%Y/%m/%d %H:%M:%S')}] {line}"
        sys.stdout.write(stamped + "\n")  # not print(): Ray Train patches it into a logger and lines come twice
        sys.stdout.flush()
        self.lines.append(stamped)
        if time.monotonic() - self._written > _LOG_EVERY_S:  # long epochs: the log still moves
            self._write_log()

    def _write_log(self) -> None:
        storage.write_text(storage.join(self.output, LOG_FILE), "\n".join(self.lines) + "\n")
        self._written = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def flush(self, history: list[dict]) -> None:
        """Write train.log, curves.png and the TensorBoard files to the output."""
        self._write_log()
        if history:
            storage.write_bytes(storage.join(self.output, CURVES_FILE), curves_png(history))
        self.tb.flush()
        for name in os.listdir(self._tb_local):
            with open(os.path.join(self._tb_local, name), "rb") as f:
                storage.write_bytes(storage.join(self._tb_remote, name), f.read())

    def close(self) -> None:
        self.tb.close()
