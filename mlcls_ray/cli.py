"""``mlcls -c CONFIG -o Section.key=value ...``: PaddleX's command line, dispatching on ``Global.mode``."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence

from mlcls_ray import storage
from mlcls_ray.config import Config, ConfigError, list_presets, load_config

__all__ = ["main", "root_cause"]


def _check_dataset(cfg: Config) -> int:
    from mlcls_ray.data.check import run_check_dataset  # imports Ray Data; config errors stay fast without it

    return run_check_dataset(cfg)


MODES: dict[str, Callable[[Config], int]] = {"check_dataset": _check_dataset}


def _init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (set inside ``ray job submit``), else start an embedded local Ray."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
    else:
        ray.init(include_dashboard=False, logging_level=logging.WARNING)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)): (.*)$", re.MULTILINE)


def root_cause(exc: BaseException) -> str:
    """``Type: message`` of the error that started a failure, on one line.

    A failure inside a Ray task reaches the driver wrapped in ``RayTaskError``, whose text is the remote traceback;
    Ray Data's ``UserCodeException`` keeps the original only in that text. Both are unwrapped here.
    """
    ray_error = sys.modules.get("ray.exceptions")
    if ray_error is not None:
        while isinstance(exc, ray_error.RayTaskError) and isinstance(exc.cause, BaseException):
            if isinstance(exc.cause, ray_error.RayError):  # the original exists only as traceback text
                first = _ANSI.sub("", str(exc)).split("The above exception was the direct cause")[0]
                found = _ERROR_LINE.findall(first)
                if found:
                    return f"{found[-1][0].rsplit('.', 1)[-1]}: {found[-1][1]}"
                break
            exc = exc.cause
    message = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {message}"


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
    try:
        storage.write_text(storage.join(cfg["Global.output"], "config.yaml"), cfg.to_yaml())
        _init_ray()
        return MODES[cfg["Global.mode"]](cfg)
    except Exception as exc:
        if os.environ.get("MLCLS_DEBUG"):
            raise
        print(f"mlcls: {cfg['Global.mode']} failed: {root_cause(exc)}\n"
              "(set MLCLS_DEBUG=1 to see the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
