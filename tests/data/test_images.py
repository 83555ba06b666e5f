"""The decoder: odd-but-valid images become RGB, bad bytes get a typed, readable reason."""

import io

import numpy as np
import pytest
from PIL import Image

from mlcls_ray.data.images import ImageDecodeError, decode_image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode, fmt", [
    ("L", "PNG"), ("LA", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("1", "PNG"), ("CMYK", "JPEG"), ("RGB", "WEBP"),
    ("RGB", "BMP"), ("RGB", "TIFF"), ("P", "GIF"),
])
def test_odd_but_valid_modes_decode_to_rgb(mode, fmt):
    img = Image.new(mode, (48, 32))
    out = decode_image(encode(img, fmt))
    assert out.shape == (32, 48, 3) and out.dtype == np.uint8


def test_palette_with_transparency_decodes():
    img = Image.new("P", (8, 8))
    img.putpalette([255, 0, 0] * 256)
    out = decode_image(encode(img, "PNG", transparency=0))
    assert out.shape == (8, 8, 3) and out[0, 0].tolist() == [255, 0, 0]


def test_16_bit_greyscale_is_scaled_not_clipped():
    arr = np.full((4, 6), 32768, dtype=np.uint16)  # mid-grey at 16 bits
    out = decode_image(encode(Image.fromarray(arr), "PNG"))
    assert out.shape == (4, 6, 3)
    assert abs(int(out[0, 0, 0]) - 128) <= 1  # a plain convert("RGB") would give 255


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (60, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    out = decode_image(encode(img, "JPEG", exif=exif))
    assert out.shape == (60, 20, 3)


@pytest.mark.parametrize("data, kind, words", [
    (b"", "empty_file", "empty file"),
    (b"this is a text file, not a picture\n", "not_an_image", "not an image"),
])
def test_bad_bytes_get_a_reason(data, kind, words):
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data)
    assert err.value.kind == kind and words in err.value.reason


def test_truncated_jpeg_is_reported_as_corrupt():
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data[: len(data) // 2])
    assert err.value.kind == "corrupt_image" and "truncated" in err.value.reason


def test_decompression_bomb_is_refused_before_decoding():
    bomb = encode(Image.new("L", (4000, 4000)), "PNG")  # a few KB on disk, 16 M pixels once decoded
    assert len(bomb) < 100_000
    with pytest.raises(ImageDecodeError) as err:
        decode_image(bomb, max_pixels=1_000_000)
    assert err.value.kind == "decompression_bomb"
    assert "4000x4000 = 16,000,000 pixels, over the limit of 1,000,000" in err.value.reason


def test_a_postscript_file_named_jpg_never_reaches_an_interpreter():
    eps = encode(Image.new("RGB", (8, 8)), "EPS")  # Pillow would hand this to Ghostscript
    with pytest.raises(ImageDecodeError) as err:
        decode_image(eps)
    assert err.value.kind == "not_an_image" and "unaccepted format" in err.value.reason
