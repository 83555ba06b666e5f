"""One readable line for any failure, including those that crossed a Ray task or actor boundary."""

from __future__ import annotations

import re
import sys

__all__ = ["root_cause"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)): (.*)$", re.MULTILINE)


def root_cause(exc: BaseException) -> str:
    """``Type: message`` of the error that started a failure, on one line.

    A failure inside a Ray task reaches the driver wrapped in ``RayTaskError``, whose text is the remote traceback;
    Ray Data's ``UserCodeException`` keeps the original only in that text. Both are unwrapped here.
    """
    train_error = sys.modules.get("ray.train.v2.api.exceptions")
    if train_error is not None and isinstance(exc, train_error.WorkerGroupError) and exc.worker_failures:
        rank, first = min(exc.worker_failures.items())
        return f"training worker {rank}: {root_cause(first)}"
    if train_error is not None and isinstance(exc, train_error.ControllerError):
        return f"training controller: {root_cause(exc.controller_failure)}"
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
