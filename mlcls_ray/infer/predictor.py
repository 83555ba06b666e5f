"""The one Predictor: a model folder in, per-class scores out. Evaluate, predict, label and serve all use it.

Preprocessing is the folder's own (``inference.yml``): squish resize to the folder's size on CPU
(:func:`~mlcls_ray.data.transforms.resize_square`), then scaling and normalisation on the model's device
(:func:`~mlcls_ray.data.transforms.to_model_input`), the same two functions training validated with.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mlcls_ray import model_dir
from mlcls_ray.data.transforms import resize_square, to_model_input

__all__ = ["Predictor"]


class Predictor:
    """Load a model folder once; call it on decoded RGB images.

    Args:
        model: a model folder (local or ``s3://``), as written by training.
        device: ``cpu`` or ``cuda[:N]``. On a GPU the forward runs under bf16 (fp16 where bf16 is missing)
            autocast with channels_last, as training does; logits are returned in fp32.
    """

    def __init__(self, model: str, device: str = "cpu"):
        self.device = torch.device(device)
        self.model, self.info = model_dir.load(model, self.device)
        self.channels_last = self.device.type == "cuda"
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.amp = None
        if self.device.type == "cuda":
            self.amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    @property
    def image_size(self) -> int:
        return self.info.spec.image_size

    def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Decoded ``[H, W, 3]`` uint8 images -> ``[B, S, S, 3]`` uint8 (the CPU half)."""
        size = self.image_size
        if not len(images):
            return np.zeros((0, size, size, 3), np.uint8)
        return np.stack([resize_square(img, size) for img in images])

    @torch.inference_mode()
    def logits(self, batch: np.ndarray) -> np.ndarray:
        """``[B, S, S, 3]`` uint8 from :meth:`preprocess` -> ``[B, C]`` float32 logits (the device half)."""
        spec = self.info.spec
        x = to_model_input(torch.from_numpy(batch).to(self.device), spec.mean, spec.std, self.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            return self.model(x).float().cpu().numpy()

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Decoded images -> ``[B, C]`` float32 probabilities."""
        return 1.0 / (1.0 + np.exp(-self.logits(self.preprocess(images))))
