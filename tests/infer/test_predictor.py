"""The Predictor: bytes in, PaddleX labels out, and the device-decode path (torchvision) against the one decoder."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from mlcls_ray.data.images import decode_image, device_decodable
from mlcls_ray.infer.predictor import Predictor


def _jpeg(size=(64, 48), seed=0, mode="RGB", exif_rotation: int | None = None) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    exif = Image.Exif()
    if exif_rotation:
        exif[0x0112] = exif_rotation
    img.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


def test_scores_from_bytes_equal_scores_from_decoded_images(tiny_model):
    predictor = Predictor(tiny_model)
    files = [_jpeg(seed=i) for i in range(3)]
    probs, errors = predictor.score_encoded(files)
    assert errors == [None] * 3
    np.testing.assert_allclose(probs, predictor([decode_image(f) for f in files]), atol=1e-6)


def test_labels_follow_paddlex(tiny_model):
    predictor = Predictor(tiny_model, threshold={"default": 0.5, "top_right": 0.0})
    probs = np.array([[0.9, 0.1, 0.5, 0.7], [0.2, 0.0, 0.2, 0.2]], np.float32)
    assert predictor.labels(probs) == [
        {"class_ids": [0, 3, 1], "scores": [0.9, 0.7, 0.1], "label_names": ["top_left", "bottom_right", "top_right"]},
        {"class_ids": [], "scores": [], "label_names": []}]  # 0.5 is not > 0.5, and 0.0 not > 0.0


def test_device_decode_matches_the_cpu_path_and_falls_back(tiny_model):
    cpu = Predictor(tiny_model)
    device = Predictor(tiny_model, device_decode=True)  # torchvision's decoder on the CPU stands in for nvJPEG
    good = [_jpeg(size=(80, 50), seed=i) for i in range(3)]
    grey, rotated, cmyk = _jpeg(seed=5, mode="L"), _jpeg(seed=6, exif_rotation=6), _jpeg(seed=7, mode="CMYK")
    cut = good[0][:len(good[0]) // 2]  # a good header, a truncated body
    assert all(map(device_decodable, good + [grey])) and not any(map(device_decodable, (rotated, cmyk, b"x")))
    files = good + [grey, rotated, cmyk, cut, b"not an image"]
    squares, errors = device.squares(files)
    expected, expected_errors = cpu.squares(files)
    assert [e and e.kind for e in errors] == [e and e.kind for e in expected_errors] == \
        [None] * 6 + ["corrupt_image", "not_an_image"]
    got, want = squares.numpy().astype(int), expected.numpy().astype(int)  # [8, 32, 32, 3]
    assert np.abs(got[:4] - want[:4]).max() <= 1  # the JPEGs: antialiased torch resize vs PIL, a grey level at most
    np.testing.assert_array_equal(got[4:], want[4:])  # rotated and CMYK took the CPU path; failures are zeros
    probs, _ = device.score_encoded(files)
    np.testing.assert_array_equal(probs[:6], device.probabilities(squares.numpy()[:6]))
    assert not probs[6:].any()


def test_a_device_out_of_memory_decodes_that_batch_on_the_cpu(tiny_model, monkeypatch):
    """nvJPEG out of memory (a batch of huge photos) must cost speed, not the job: the batch is decoded on the CPU."""
    import torchvision.io

    def out_of_memory(*_args, **_kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    files = [_jpeg(size=(80, 50), seed=i) for i in range(3)]
    expected, _ = Predictor(tiny_model).squares(files)
    monkeypatch.setattr(torchvision.io, "decode_jpeg", out_of_memory)
    squares, errors = Predictor(tiny_model, device_decode=True).squares(files)
    assert errors == [None] * 3
    np.testing.assert_array_equal(squares.numpy(), expected.numpy())  # decoded by the CPU path, exactly
