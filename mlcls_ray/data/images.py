"""The one image decoder: bytes -> RGB uint8 array, with a pixel limit, EXIF rotation and mode conversion."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["DEFAULT_MAX_PIXELS", "ImageDecodeError", "decode_image"]

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own warning threshold: ~ 9459 x 9459
_ORIENTATION = 0x0112  # EXIF tag

# This module enforces its own limit (before decoding, with a readable reason), so Pillow's global one is off.
Image.MAX_IMAGE_PIXELS = None


class ImageDecodeError(ValueError):
    """An image could not be decoded. ``kind`` is a stable code; the message is the readable reason."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Any Pillow mode -> [H, W, 3] uint8."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit and 32-bit greyscale: scale to 8 bits instead of letting convert("L") clip at 255.
        arr = np.asarray(img, dtype=np.float64)  # [H, W]
        peak = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        grey = np.clip(arr * (255.0 / peak) if peak > 255 else arr, 0, 255).round().astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # Pillow asks for this route for palette transparency
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, LA, 1, RGBA, CMYK, YCbCr, LAB, HSV: Pillow's standard conversions
    return np.asarray(img)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode every pixel of an image file into an ``[H, W, 3]`` uint8 RGB array, EXIF orientation applied.

    Args:
        data: the file's bytes.
        max_pixels: refuse images with more pixels than this (decompression bombs), before decoding them.

    Raises:
        ImageDecodeError: with ``kind`` one of ``empty_file``, ``not_an_image``, ``decompression_bomb``,
            ``corrupt_image``, and a reason a person can act on.
    """
    if not data:
        raise ImageDecodeError("empty_file", "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns on odd metadata; failures below still raise
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    "decompression_bomb",
                    f"{width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
                    "(a decompression bomb, or raise Global.max_image_pixels)",
                )
            img.load()  # full decode: truncated or corrupt data fails here, not later in training
            if img.getexif().get(_ORIENTATION, 1) != 1:  # exif_transpose copies even when there is nothing to do
                img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not_an_image", f"not an image (unrecognised format, {len(data):,} bytes)") from None
    except Exception as exc:  # Pillow's plugins raise many types on hostile input; one bad file must not end a job
        raise ImageDecodeError("corrupt_image", f"truncated or corrupt image data ({type(exc).__name__}: {exc})") \
            from None
