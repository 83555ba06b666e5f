"""Train and eval transforms, defined once: square resize, Cutout, the RandAugment pair, and normalisation.

The CPU half (:func:`resize_square`, :class:`TrainAugment`) runs on decoded ``[H, W, 3]`` uint8 arrays in Ray Data
tasks and hands uint8 on, a quarter of the bytes of float32. The device half (:class:`ModelInput`) scales and
normalises a uint8 batch on the model's device. Training, evaluation and the Predictor all call these, so
preprocessing cannot drift between them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

__all__ = ["AUGMENTS", "ModelInput", "TrainAugment", "resize_square", "resize_square_on_device"]

AUGMENTS = ("ml_decoder", "light", "none")
_FILL = (128, 128, 128)  # RandAugment's fill, as PaddleClas's RandAugmentV4


def resize_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """``[H, W, 3]`` uint8 -> ``[size, size, 3]`` uint8: PIL bilinear "squish" resize, no crop (the eval transform)."""
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR))


def resize_square_on_device(rgb: torch.Tensor, size: int) -> torch.Tensor:
    """:func:`resize_square` for a ``[H, W, 3]`` uint8 tensor on any device (images decoded on the GPU).

    Bilinear with antialiasing, which is how PIL's bilinear filter shrinks: it matches :func:`resize_square` to
    within a grey level or two per pixel, not bit for bit.
    """
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return rgb
    x = rgb.permute(2, 0, 1).unsqueeze(0).float()  # [1, 3, H, W]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)[0].permute(1, 2, 0)  # [S, S, 3]


def _shear_x(img: Image.Image, m: float) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, (1, m, 0, 0, 1, 0), Image.BICUBIC, fillcolor=_FILL)


def _shear_y(img: Image.Image, m: float) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, (1, 0, 0, m, 1, 0), Image.BICUBIC, fillcolor=_FILL)


def _translate_x(img: Image.Image, m: float) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, (1, 0, m * img.size[0], 0, 1, 0), fillcolor=_FILL)


def _translate_y(img: Image.Image, m: float) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, m * img.size[1]), fillcolor=_FILL)


def _cutout(img: Image.Image, side: int, rng: np.random.Generator, fill: tuple[int, int, int]) -> Image.Image:
    """One ``side`` x ``side`` hole at a random centre (clipped at the borders)."""
    w, h = img.size
    cx, cy = int(rng.integers(w)), int(rng.integers(h))
    out = img.copy()
    out.paste(fill, (max(cx - side // 2, 0), max(cy - side // 2, 0), min(cx + side // 2, w), min(cy + side // 2, h)))
    return out


# RandAugmentV4's ops: (magnitude 1..9 -> op argument), applied to a PIL image; a signed magnitude flips at random
_MAX_LEVEL = 10


def _level(m: int, top: float) -> float:
    return m / _MAX_LEVEL * top


_OPS = {
    "shear_x": lambda img, m, s, rng: _shear_x(img, s * _level(m, 0.3)),
    "shear_y": lambda img, m, s, rng: _shear_y(img, s * _level(m, 0.3)),
    "translate_x": lambda img, m, s, rng: _translate_x(img, s * _level(m, 150 / 331)),
    "translate_y": lambda img, m, s, rng: _translate_y(img, s * _level(m, 150 / 331)),
    "rotate": lambda img, m, s, rng: img.rotate(s * _level(m, 30), fillcolor=_FILL),
    "color": lambda img, m, s, rng: ImageEnhance.Color(img).enhance(1 + s * _level(m, 0.9)),
    "contrast": lambda img, m, s, rng: ImageEnhance.Contrast(img).enhance(1 + s * _level(m, 0.9)),
    "sharpness": lambda img, m, s, rng: ImageEnhance.Sharpness(img).enhance(1 + s * _level(m, 0.9)),
    "brightness": lambda img, m, s, rng: ImageEnhance.Brightness(img).enhance(1 + s * _level(m, 0.9)),
    "posterize": lambda img, m, s, rng: ImageOps.posterize(img, 8 - int(_level(m, 4))),
    "solarize": lambda img, m, s, rng: ImageOps.solarize(img, 256 - int(_level(m, 256))),
    "autocontrast": lambda img, m, s, rng: ImageOps.autocontrast(img),
    "equalize": lambda img, m, s, rng: ImageOps.equalize(img),
    "invert": lambda img, m, s, rng: ImageOps.invert(img),
    "cutout": lambda img, m, s, rng: _cutout(img, int(_level(m, 20)), rng, _FILL),
}
_OP_NAMES = tuple(_OPS)


class TrainAugment:
    """The training transform of one recipe, on one decoded image.

    - ``ml_decoder`` (PaddleX's): squish resize to ``size``, one Cutout of half the side with a random colour,
      then one RandAugment pair: two random ops, each with a random magnitude 1-9 and applied with p=0.5. No flip.
    - ``light``: squish resize and a horizontal flip with p=0.5.
    - ``none``: squish resize only.
    """

    def __init__(self, augment: str, size: int):
        if augment not in AUGMENTS:
            raise ValueError(f"augment {augment!r}: choose one of {', '.join(AUGMENTS)}")
        self.augment, self.size = augment, size

    def __call__(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``[H, W, 3]`` uint8 -> ``[size, size, 3]`` uint8."""
        square = resize_square(rgb, self.size)
        if self.augment == "none":
            return square
        if self.augment == "light":
            return square[:, ::-1].copy() if rng.random() < 0.5 else square
        img = Image.fromarray(square)
        img = _cutout(img, self.size // 2, rng, tuple(int(c) for c in rng.integers(0, 256, 3)))
        for name in rng.choice(_OP_NAMES, size=2):
            if rng.random() < 0.5:
                img = _OPS[name](img, int(rng.integers(1, _MAX_LEVEL)), 1 if rng.random() < 0.5 else -1, rng)
        return np.asarray(img)


class ModelInput:
    """The device half of every transform: ``[B, H, W, 3]`` uint8 -> ``[B, 3, H, W]`` float32 in [0, 1], normalised.

    Mean and std live on ``device`` as tensors built once, so a training or inference step copies nothing but its
    images to the device.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu",
                 channels_last: bool = False):
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).to(torch.float32, copy=True).div_(255.0)  # [B, 3, H, W]; never the caller's
        x = x.sub_(self.mean).div_(self.std)
        return x.contiguous(memory_format=self.memory_format)
