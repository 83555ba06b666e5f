"""Decision thresholds as users give them (PaddleX 3.x): a float, a list of C floats, or ``{"default": t, id: t}``.

:func:`parse` checks the shape of a threshold wherever it comes from (a config key, a YAML file, a request body);
:func:`resolve` turns it into one threshold per class of a model. A class is predicted when its score is
``> threshold``, as in PaddleX 3.x.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import yaml

__all__ = ["Threshold", "ThresholdError", "parse", "resolve"]

Threshold = Union[float, list[float], dict[Union[int, str], float]]  # noqa: UP007 - the alias is evaluated at runtime


class ThresholdError(ValueError):
    """A threshold of the wrong shape or range; the message says what is accepted."""


_SHAPES = "a number in [0, 1], a list of one number per class, or a dict such as {default: 0.5, 3: 0.4}"


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise ThresholdError(f"{where}: {value!r} is not a number")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ThresholdError(f"{where}: {value!r} is not a number") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ThresholdError(f"{where}: {value!r} is not a number in [0, 1]")
    return float(value)


def _key(key: Any) -> int | str:
    """A dict key: a class id (an int or a string of digits) or a class name."""
    if isinstance(key, bool):
        raise ThresholdError(f"threshold key {key!r} is not a class id or name")
    if isinstance(key, int):
        return key
    text = str(key).strip()
    return int(text) if text.isdigit() else text


def parse(value: Any) -> Threshold | None:
    """Check a threshold's shape and range; ``None`` (or ``"None"``) means the model folder's own thresholds.

    ``value`` may be text as typed after ``-o`` (``0.4``, ``[0.3, 0.6]``, ``{default: 0.5, 3: 0.4}``), or the
    parsed YAML or JSON value.

    Raises:
        ThresholdError: the value is not one of the accepted shapes; a dict without ``default`` is refused, as in
            PaddleX.
    """
    if isinstance(value, str):
        text = value.strip()
        if text in ("", "None", "none", "null", "~"):
            return None
        try:
            value = yaml.safe_load(text) if text[0] in "[{" else text
        except yaml.YAMLError:
            raise ThresholdError(f"threshold {text!r} does not parse; use {_SHAPES}") from None
    if value is None:
        return None
    if isinstance(value, dict):
        parsed = {_key(k): _number(v, f"threshold[{k!r}]") for k, v in value.items()}
        if "default" not in parsed:
            raise ThresholdError("a threshold dict needs a 'default' key for the classes it does not name, "
                                 "e.g. {default: 0.5, 3: 0.4} (as in PaddleX)")
        return parsed
    if isinstance(value, (list, tuple)):
        if not value:
            raise ThresholdError(f"threshold: an empty list; use {_SHAPES}")
        return [_number(v, f"threshold[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        return _number(value, "threshold")
    raise ThresholdError(f"threshold {value!r}: use {_SHAPES}")


def resolve(threshold: Threshold | None, label_names: Sequence[str], default: Sequence[float]) -> np.ndarray:
    """One threshold per class: ``[C]`` float32.

    Args:
        threshold: a parsed threshold, or None for ``default``.
        label_names: the model's class names, in class order (dict keys may name classes).
        default: the model folder's calibrated per-class thresholds.

    Raises:
        ThresholdError: a list of the wrong length, or a dict key that is no class of the model.
    """
    c = len(label_names)
    if threshold is None:
        return np.asarray(default, np.float32)
    if isinstance(threshold, (int, float)):
        return np.full(c, threshold, np.float32)
    if isinstance(threshold, list):
        if len(threshold) != c:
            raise ThresholdError(f"threshold: a list of {len(threshold)} numbers, but the model has {c} classes")
        return np.asarray(threshold, np.float32)
    out = np.full(c, threshold["default"], np.float32)
    ids = {name: i for i, name in enumerate(label_names)}
    for key, t in threshold.items():
        if key == "default":
            continue
        if isinstance(key, int):
            if not 0 <= key < c:
                raise ThresholdError(f"threshold key {key}: the model's class ids are 0..{c - 1}")
            out[key] = t
        elif key in ids:
            out[ids[key]] = t
        else:
            raise ThresholdError(f"threshold key {key!r} is not a class of the model (ids 0..{c - 1}, or names "
                                 f"such as {', '.join(map(repr, list(label_names)[:3]))})")
    return out
