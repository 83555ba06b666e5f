"""Mixed precision: the autocast dtype training and inference run in on a device.

``auto`` is bf16 on GPUs that compute it natively (Ampere and later), fp16 with a gradient scaler on older ones
(V100, T4: torch reports bf16 there too, through slow emulation), and fp32 on CPU. ``bf16``, ``fp16`` and ``fp32``
force one, on any device (CPU autocast runs both half types, which is how the tests exercise these paths).
"""

from __future__ import annotations

import torch

__all__ = ["PRECISIONS", "autocast_dtype", "precision_name"]

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_FORCED = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The dtype to autocast to on ``device`` (None: fp32, autocast off)."""
    if precision != "auto":
        if precision not in _FORCED:
            raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
        return _FORCED[precision]
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def precision_name(dtype: torch.dtype | None) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
