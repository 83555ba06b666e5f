"""The one Predictor: a model folder in, per-class scores and labels out. Evaluate, predict, label and serve use it.

Preprocessing is the folder's own (``inference.yml``): the one decoder, a squish resize to the folder's size on CPU
(:func:`~mlcls_ray.data.transforms.resize_square`), then scaling and normalisation on the model's device
(:class:`~mlcls_ray.data.transforms.ModelInput`), the same functions training validated with. On a GPU, plain
JPEGs may instead be decoded and resized on the device (:meth:`Predictor.squares`); every other file, any that the
device decoder fails on, and a batch it has no memory for take the CPU path.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mlcls_ray import model_dir
from mlcls_ray.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, decode_jpegs, device_decodable
from mlcls_ray.data.transforms import ModelInput, resize_square, resize_square_on_device
from mlcls_ray.infer import thresholds as thr
from mlcls_ray.precision import autocast_dtype

__all__ = ["Predictor", "decode_square", "preprocess"]


def preprocess(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Decoded ``[H, W, 3]`` uint8 images -> ``[B, S, S, 3]`` uint8: the CPU half of every inference path."""
    if not len(images):
        return np.zeros((0, size, size, 3), np.uint8)
    return np.stack([resize_square(img, size) for img in images])


def decode_square(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An image file's bytes -> ``[S, S, 3]`` uint8, through the one decoder and the squish resize.

    Raises:
        ImageDecodeError: the file is not an image, is corrupt, or is over the pixel limit.
    """
    return resize_square(decode_image(data, max_pixels), size)


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return torch.from_numpy(logits).sigmoid().numpy()  # float32, no overflow warnings for large logits


class Predictor:
    """Load a model folder once; call it on images.

    Args:
        model: a model folder (local or ``s3://``), as written by training or export.
        device: ``cpu`` or ``cuda[:N]``. On a GPU the forward runs under bf16 (fp16 where bf16 is missing)
            autocast with channels_last, as training does; the head and the logits stay fp32.
        max_pixels: images with more pixels are refused before they are decoded.
        threshold: the default decision rule (see :mod:`mlcls_ray.infer.thresholds`); None keeps the folder's
            calibrated per-class thresholds.
        device_decode: decode plain JPEGs with torchvision on ``device`` (nvJPEG on a GPU) instead of with PIL;
            None means on a GPU only.
    """

    def __init__(self, model: str, device: str = "cpu", max_pixels: int = DEFAULT_MAX_PIXELS,
                 threshold: thr.Threshold | None = None, device_decode: bool | None = None):
        self.device = torch.device(device)
        self.model, self.info = model_dir.load(model, self.device)
        self.max_pixels = max_pixels
        self.thresholds = thr.resolve(threshold, self.info.label_names, self.info.thresholds)  # [C]
        self.channels_last = self.device.type == "cuda"
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.amp = autocast_dtype(self.device)
        spec = self.info.spec
        self.to_input = ModelInput(spec.mean, spec.std, self.device, self.channels_last)
        self.device_decode = self.device.type == "cuda" if device_decode is None else device_decode

    @property
    def image_size(self) -> int:
        return self.info.spec.image_size

    @property
    def label_names(self) -> list[str]:
        return self.info.label_names

    def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Decoded ``[H, W, 3]`` uint8 images -> ``[B, S, S, 3]`` uint8 (the CPU half)."""
        return preprocess(images, self.image_size)

    def decode(self, data: bytes) -> np.ndarray:
        """An image file's bytes -> ``[S, S, 3]`` uint8 (:func:`decode_square` at this model's size)."""
        return decode_square(data, self.image_size, self.max_pixels)

    @torch.inference_mode()
    def _forward(self, batch: torch.Tensor) -> np.ndarray:
        x = self.to_input(batch.to(self.device))  # [B, 3, S, S]
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            return self.model(x).float().cpu().numpy()

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """``[B, S, S, 3]`` uint8 from :meth:`preprocess` -> ``[B, C]`` float32 logits (the device half)."""
        # Ray Data hands out read-only arrays; torch wants writable ones even to read them (uint8: a cheap copy)
        return self._forward(torch.from_numpy(batch if batch.flags.writeable else batch.copy()))

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """``[B, S, S, 3]`` uint8 -> ``[B, C]`` float32 probabilities."""
        return _sigmoid(self.logits(batch))

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Decoded images -> ``[B, C]`` float32 probabilities."""
        return self.probabilities(self.preprocess(images))

    def squares(self, files: Sequence[bytes | np.ndarray]) -> tuple[torch.Tensor, list[ImageDecodeError | None]]:
        """Image files' bytes -> ``[B, S, S, 3]`` uint8 on the model's device (zeros where a file failed) and each
        file's error: what :meth:`score_encoded` feeds the model.

        An item may also be an ``[S, S, 3]`` uint8 square a CPU task already decoded (label routes every file that is
        not a plain JPEG so). With device decoding on, plain JPEGs are decoded and resized on the device
        (:func:`~mlcls_ray.data.images.decode_jpegs`, a bounded batch at a time); the rest, and a batch the device
        had no memory for, go through :meth:`decode`.
        """
        size = self.image_size
        errors: list[ImageDecodeError | None] = [None] * len(files)
        squares: list[torch.Tensor | None] = [None] * len(files)
        for i, f in enumerate(files):
            if isinstance(f, np.ndarray):
                squares[i] = torch.tensor(f, device=self.device)  # a copy: Ray Data's arrays are read-only
        on_device = [i for i, f in enumerate(files) if squares[i] is None and self.device_decode
                     and device_decodable(f, self.max_pixels)]
        if on_device:
            decoded = decode_jpegs([files[i] for i in on_device], str(self.device),
                                   lambda img: resize_square_on_device(img, size))
            for i, square in zip(on_device, decoded):
                squares[i] = square
        for i, f in enumerate(files):
            if squares[i] is None:
                try:
                    squares[i] = torch.tensor(self.decode(f), device=self.device)  # PIL arrays are read-only
                except ImageDecodeError as exc:
                    errors[i] = exc
                    squares[i] = torch.zeros((size, size, 3), dtype=torch.uint8, device=self.device)
        if not files:
            return torch.zeros((0, size, size, 3), dtype=torch.uint8, device=self.device), errors
        return torch.stack(squares), errors

    def score_encoded(self, files: Sequence[bytes | np.ndarray]) -> tuple[np.ndarray, list[ImageDecodeError | None]]:
        """Image files' bytes (or decoded squares, see :meth:`squares`) -> ``[B, C]`` float32 probabilities (zeros
        where a file failed) and each file's error."""
        squares, errors = self.squares(files)
        good = [i for i, e in enumerate(errors) if e is None]
        probs = np.zeros((len(files), len(self.label_names)), np.float32)
        if good:
            probs[good] = _sigmoid(self._forward(squares[good]))
        return probs, errors

    def thresholds_for(self, threshold: thr.Threshold | None) -> np.ndarray:
        """``[C]`` thresholds for a request's override, or the Predictor's own when it is None."""
        return self.thresholds if threshold is None else thr.resolve(threshold, self.label_names,
                                                                     self.info.thresholds)

    def labels(self, probs: np.ndarray, thresholds: np.ndarray | None = None) -> list[dict]:
        """PaddleX's result per image: ``class_ids``, ``scores`` (5 decimals) and ``label_names`` of the classes with
        ``score > threshold``, highest score first."""
        t = self.thresholds if thresholds is None else thresholds
        out = []
        for row in probs:
            ids = np.flatnonzero(row > t)
            ids = ids[np.argsort(-row[ids], kind="stable")]
            out.append({"class_ids": ids.tolist(), "scores": [round(float(row[i]), 5) for i in ids],
                        "label_names": [self.label_names[i] for i in ids]})
        return out
