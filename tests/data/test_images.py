"""The decoder: odd-but-valid images become RGB, bad bytes get a typed, readable reason."""

import io
import subprocess
import sys
import threading
import time
import warnings
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from mlcls_ray.data.images import MAX_PIXELS_CEILING, ImageDecodeError, decode_image, decode_jpegs


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


@pytest.mark.parametrize("orientation, shape, corner", [
    (1, (20, 60), "top_left"),
    (3, (20, 60), "bottom_right"),  # stored upside down
    (6, (60, 20), "top_right"),  # stored rotated: display turns it 90 degrees clockwise
    (8, (60, 20), "bottom_left"),  # display turns it 90 degrees counter-clockwise
])
def test_exif_orientation_puts_the_marked_corner_where_a_viewer_shows_it(orientation, shape, corner):
    img = Image.new("RGB", (60, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 8, 8))  # a red mark in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = decode_image(encode(img, "PNG", exif=exif))
    assert out.shape[:2] == shape
    corners = {"top_left": out[2, 2], "top_right": out[2, -3], "bottom_left": out[-3, 2], "bottom_right": out[-3, -3]}
    assert [name for name, px in corners.items() if px[0] > 200 and px[2] < 50] == [corner]


def test_decoding_from_many_threads_never_touches_the_warning_filters():
    """``warnings.catch_warnings()`` swaps the process-wide filters; from several threads it corrupts them."""
    img = Image.new("RGB", (16, 16))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(img, "JPEG", exif=exif)
    before = list(warnings.filters)
    seen_changed = threading.Event()
    stop = threading.Event()

    def decode_many():
        while not stop.is_set():
            decode_image(data)

    def watch():
        while not stop.is_set():
            if list(warnings.filters) != before:
                seen_changed.set()

    threads = [threading.Thread(target=decode_many) for _ in range(4)] + [threading.Thread(target=watch)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join()
    assert not seen_changed.is_set() and list(warnings.filters) == before


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


_PEAK_GROWTH = """
import sys
from mlcls_ray.data.images import MAX_PIXELS_CEILING, ImageDecodeError, decode_image

def peak_kb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])

data = open(sys.argv[1], "rb").read()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak: a child starts with its parent's high-water mark (a large pytest's)
base = peak_kb()
try:
    decode_image(data, max_pixels=int(sys.argv[2]))
    print("decoded")
except ImageDecodeError as exc:
    print(exc.kind, exc.reason)
print((peak_kb() - base) // 1024)  # peak growth, MB
"""


def test_decompression_bomb_is_refused_before_its_pixels_are_allocated(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("L", (10_000, 10_000)).save(bomb)  # 100 M pixels, 300 MB as RGB; about 100 KB on disk
    assert bomb.stat().st_size < 1_000_000

    def peak(max_pixels):
        out = subprocess.run([sys.executable, "-c", _PEAK_GROWTH, str(bomb), str(max_pixels)], capture_output=True,
                             text=True, timeout=120, check=True).stdout.splitlines()
        return out[0], int(out[1])

    verdict, grown_mb = peak(1_000_000)
    assert verdict == "decompression_bomb 10000x10000 = 100,000,000 pixels, over the limit of 1,000,000 " \
                      "(a decompression bomb, or raise Global.max_image_pixels)"
    assert grown_mb < 30  # nothing near the 100 MB of one decoded plane
    verdict, grown_mb = peak(MAX_PIXELS_CEILING)  # the same file, allowed: the measurement does see a decode
    assert verdict == "decoded" and grown_mb > 250


def test_a_postscript_file_named_jpg_never_reaches_an_interpreter():
    eps = encode(Image.new("RGB", (8, 8)), "EPS")  # Pillow would hand this to Ghostscript
    with pytest.raises(ImageDecodeError) as err:
        decode_image(eps)
    assert err.value.kind == "not_an_image" and "unaccepted format" in err.value.reason


def test_device_decode_holds_one_batch_at_full_resolution():
    """decode_jpegs (the CPU decoder stands in for nvJPEG) shrinks each batch's images before it decodes the next, so
    a batch of large photos never sits on the device at full resolution at once; the results do not depend on it."""
    rng = np.random.default_rng(0)
    files = [encode(Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)), "JPEG") for _ in range(5)]
    alive_at_each_call = []
    full_res: list[weakref.ref] = []

    def shrink(img: torch.Tensor) -> torch.Tensor:  # [H, W, 3], a view of the decoder's [3, H, W] output
        alive_at_each_call.append(sum(r() is not None for r in full_res))
        full_res.append(weakref.ref(img._base))
        return img[::10, ::10].clone()

    small = decode_jpegs(files, "cpu", shrink, batch_pixels=2 * 60 * 80)  # two images a batch
    assert alive_at_each_call == [0, 1, 0, 1, 0]
    one_batch = decode_jpegs(files, "cpu", lambda img: img[::10, ::10].clone())
    assert all(torch.equal(a, b) for a, b in zip(small, one_batch))
    assert all(torch.equal(a, torch.tensor(decode_image(f)[::10, ::10])) for a, f in zip(small, files))
