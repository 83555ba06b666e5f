"""``mlcls -c CONFIG -o Section.key=value ...``: PaddleX's command line, dispatching on ``Global.mode``."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from mlcls_ray import storage
from mlcls_ray.config import Config, ConfigError, list_presets, load_config
from mlcls_ray.errors import root_cause

__all__ = ["main", "root_cause"]


# mode -> "module:function" of its runner, imported on use: a config error stays fast without Ray or torch
MODES: dict[str, str] = {
    "check_dataset": "mlcls_ray.data.check:run_check_dataset",
    "train": "mlcls_ray.train.run:run_train",
    "evaluate": "mlcls_ray.train.evaluate:run_evaluate",
    "export": "mlcls_ray.infer.export:run_export",
    "predict": "mlcls_ray.infer.predict:run_predict",
    "label": "mlcls_ray.infer.label:run_label",
    "serve": "mlcls_ray.infer.serve:run_serve",
    "audit": "mlcls_ray.audit.run:run_audit",
}
_WITHOUT_RAY = ("export", "predict")  # one process: a Ray start-up would cost more than the work


def _init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (set inside ``ray job submit``), else start an embedded local Ray."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
    else:  # with the dashboard: Ray Train's state API needs it, and users watch jobs there
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", logging_level=logging.WARNING)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlcls",
        description="Multi-label image classification on Ray, with PaddleX's interface.",
        epilog=f"presets: {', '.join(list_presets())}",
    )
    parser.add_argument("-c", "--config", required=True, help="a preset name or a YAML file (local or s3://)")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="Section.key=value",
                        help="override one config key, e.g. -o Global.mode=check_dataset (repeatable)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one mode; returns the exit code: 0 success, 1 the job found problems or failed, 2 bad config.

    A failure is one readable line on stderr, not a traceback; ``MLCLS_DEBUG=1`` shows the traceback.
    """
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.override)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"mlcls: config error: {problem}", file=sys.stderr)
        return 2
    for key, value in cfg.overrides.items():
        print(f"override {key} = {value!r}")
    for warning in cfg.warnings:
        print(f"mlcls: warning: {warning}", file=sys.stderr)
    try:
        storage.write_text(storage.join(cfg["Global.output"], "config.yaml"), cfg.to_yaml())
        if cfg["Global.mode"] not in _WITHOUT_RAY:
            _init_ray()
        module, name = MODES[cfg["Global.mode"]].split(":")
        runner: Callable[[Config], int] = getattr(importlib.import_module(module), name)
        return runner(cfg)
    except Exception as exc:
        if os.environ.get("MLCLS_DEBUG"):
            raise
        print(f"mlcls: {cfg['Global.mode']} failed: {root_cause(exc)}\n"
              "(set MLCLS_DEBUG=1 to see the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
