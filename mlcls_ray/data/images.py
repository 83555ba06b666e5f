"""The one image decoder: bytes -> RGB uint8 array, with a pixel limit, EXIF rotation and mode conversion.

It is called from many threads at once (Ray Data tasks read with I/O threads), so it keeps no state and does not
touch the warning filters per call: ``warnings.catch_warnings()`` swaps the process-wide filters and is not
thread-safe. Pillow's warnings (odd metadata, large images under our own limit) are silenced once, at import; real
failures still raise.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_MAX_PIXELS", "DEVICE_BATCH_PIXELS", "FORMATS", "MAX_PIXELS_CEILING", "ImageDecodeError",
           "decode_image", "decode_jpegs", "device_decodable"]

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own warning threshold: ~ 9459 x 9459
MAX_PIXELS_CEILING = 2 * DEFAULT_MAX_PIXELS  # Pillow refuses larger images itself; no limit can go above it
DEVICE_BATCH_PIXELS = 1 << 26  # full-resolution pixels a device decodes at once: 67 MP, 200 MB of RGB
_ORIENTATION = 0x0112  # EXIF tag
# Raster formats a labelling dataset holds. Pillow's other openers (EPS through Ghostscript, PSD, FITS, ...) are
# never handed a user's file: a ".jpg" that is really PostScript must not reach an interpreter.
Image.init()  # register every plugin, so the names below can be looked up
FORMATS = tuple(f for f in ("JPEG", "MPO", "PNG", "GIF", "BMP", "DIB", "TIFF", "WEBP", "PPM", "TGA", "ICO", "JPEG2000",
                            "AVIF", "QOI") if f in Image.OPEN)
# Pillow attributes its warnings to its own modules or, with stacklevel=2, to this one
warnings.filterwarnings("ignore", module=r"PIL\.|mlcls_ray\.data\.images")


class ImageDecodeError(ValueError):
    """An image could not be decoded. ``kind`` is a stable code; the message is the readable reason."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def _bomb(width: int, height: int, max_pixels: int) -> ImageDecodeError:
    return ImageDecodeError(
        "decompression_bomb",
        f"{width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
        "(a decompression bomb, or raise Global.max_image_pixels)",
    )


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
        img = Image.open(io.BytesIO(data), formats=FORMATS)
        width, height = img.size
        if width * height > max_pixels:
            raise _bomb(width, height, max_pixels)
        img.load()  # full decode: truncated or corrupt data fails here, not later in training
        if img.getexif().get(_ORIENTATION, 1) != 1:  # exif_transpose copies even when there is nothing to do
            img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(
            "not_an_image", f"not an image (unrecognised or unaccepted format, {len(data):,} bytes)") from None
    except Image.DecompressionBombError as exc:  # over Pillow's own ceiling: refused inside Image.open, before ours
        raise ImageDecodeError("decompression_bomb", f"{exc} (over the limit of {max_pixels:,})") from None
    except Exception as exc:  # Pillow's plugins raise many types on hostile input; one bad file must not end a job
        raise ImageDecodeError("corrupt_image", f"truncated or corrupt image data ({type(exc).__name__}: {exc})") \
            from None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """A clean JPEG header's ``(width, height)`` if a device decoder may take the file: RGB or greyscale, no EXIF
    rotation; None for anything else. Only the header is read."""
    try:
        img = Image.open(io.BytesIO(data), formats=("JPEG",))
        if img.format == "JPEG" and img.mode in ("RGB", "L") and img.getexif().get(_ORIENTATION, 1) == 1:
            return img.size
    except Exception:  # noqa: BLE001 - not a clean JPEG header: the CPU decoder will say what it is
        pass
    return None


def device_decodable(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> bool:
    """Whether a file may skip :func:`decode_image` for a device JPEG decoder: a JPEG in RGB or greyscale, with no
    EXIF rotation, within the pixel limit. Only the header is read. Anything else, including every file that
    :func:`decode_image` would refuse, goes through :func:`decode_image`, so the limits and errors stay its own."""
    size = _jpeg_size(data)
    return size is not None and size[0] * size[1] <= max_pixels


def decode_jpegs(datas: Sequence[bytes], device: str, resize: Callable[[torch.Tensor], torch.Tensor],
                 batch_pixels: int = DEVICE_BATCH_PIXELS) -> list[torch.Tensor | None]:
    """Decode JPEGs that passed :func:`device_decodable` on ``device`` (nvJPEG on ``cuda``), a batch at a time, and
    shrink each with ``resize`` before the next batch is decoded.

    A batch holds at most ``batch_pixels`` full-resolution pixels (an image over that goes alone), so the device never
    holds more than one batch at full resolution: 32 photos of 89 MP would be 8 GB at once.

    Args:
        datas: the files' bytes.
        device: a torch device.
        resize: ``[H, W, 3]`` uint8 on ``device`` -> what to keep, e.g. the model's square.
        batch_pixels: full-resolution pixels decoded together at most.

    Returns:
        One ``resize`` result per file, or None where the device did not decode it: a corrupt body behind a good
        header, or the device out of memory (then the whole batch). The caller decodes those with
        :func:`decode_image` on the CPU, which names any error.
    """
    out: list[torch.Tensor | None] = []
    batch: list[bytes] = []
    pixels = 0
    for data in datas:
        width, height = _jpeg_size(data) or (0, 0)
        if batch and pixels + width * height > batch_pixels:
            out += _decode_batch(batch, device, resize)
            batch, pixels = [], 0
        batch.append(data)
        pixels += width * height
    return out + (_decode_batch(batch, device, resize) if batch else [])


def _decode_batch(datas: list[bytes], device: str, resize: Callable[[torch.Tensor], torch.Tensor]) -> list:
    """One batch of :func:`decode_jpegs`; the full-resolution images are freed when it returns."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        return [resize(img.permute(1, 2, 0)) for img in decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)]
    except torch.OutOfMemoryError:
        return [None] * len(datas)  # the CPU decodes this batch; the allocator has already let go of its cache
    except Exception:  # noqa: BLE001 - one bad file fails the batch; find it one by one
        pass
    out = []
    for t in tensors:
        try:
            out.append(resize(decode_jpeg(t, mode=ImageReadMode.RGB, device=device).permute(1, 2, 0)))
        except Exception:  # noqa: BLE001 - out of memory too: the CPU decodes it
            out.append(None)
    return out
