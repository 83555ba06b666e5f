"""Train and eval transforms: the squish resize, the three augment recipes, and normalisation on the device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mlcls_ray.data.transforms import AUGMENTS, ModelInput, TrainAugment, resize_square

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _image(h: int = 30, w: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_resize_square_is_pil_bilinear_squish():
    rgb = _image(30, 40)
    out = resize_square(rgb, 24)
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8
    expected = np.asarray(Image.fromarray(rgb).resize((24, 24), Image.BILINEAR))
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(resize_square(out, 24), out)  # already square: unchanged


def test_none_is_the_eval_resize():
    rgb = _image()
    out = TrainAugment("none", 24)(rgb, np.random.default_rng(0))
    np.testing.assert_array_equal(out, resize_square(rgb, 24))


def test_light_is_the_resize_or_its_mirror():
    rgb = _image()
    square = resize_square(rgb, 24)
    augment, rng = TrainAugment("light", 24), np.random.default_rng(0)
    flipped = 0
    for _ in range(40):
        out = augment(rgb, rng)
        if np.array_equal(out, square[:, ::-1]):
            flipped += 1
        else:
            np.testing.assert_array_equal(out, square)
    assert 5 <= flipped <= 35  # p = 0.5


def test_ml_decoder_changes_the_image_and_repeats_with_the_seed():
    rgb = _image()
    before = rgb.copy()
    augment, square = TrainAugment("ml_decoder", 24), resize_square(rgb, 24)
    outs = [augment(rgb, np.random.default_rng(seed)) for seed in range(20)]
    for out in outs:
        assert out.shape == (24, 24, 3) and out.dtype == np.uint8
    assert sum(not np.array_equal(out, square) for out in outs) >= 18  # Cutout always; the RandAugment pair often
    assert len({out.tobytes() for out in outs}) >= 18  # seeds differ, so do the images
    np.testing.assert_array_equal(augment(rgb, np.random.default_rng(7)), outs[7])
    np.testing.assert_array_equal(rgb, before)  # the decoded image is not written to


def test_unknown_augment_lists_the_choices():
    with pytest.raises(ValueError, match="augment 'mixup': choose one of ml_decoder, light, none"):
        TrainAugment("mixup", 24)
    assert AUGMENTS == ("ml_decoder", "light", "none")


def test_model_input_scales_and_normalises():
    images = torch.from_numpy(np.stack([_image(8, 6, seed) for seed in range(2)]))  # [2, 8, 6, 3] uint8
    x = ModelInput(MEAN, STD)(images)
    assert x.shape == (2, 3, 8, 6) and x.dtype == torch.float32 and x.is_contiguous()
    by_hand = (images.numpy().astype(np.float64) / 255 - np.array(MEAN)) / np.array(STD)  # [B, H, W, 3]
    np.testing.assert_allclose(x.numpy(), by_hand.transpose(0, 3, 1, 2), rtol=0, atol=1e-5)


def test_model_input_channels_last():
    images = torch.from_numpy(np.stack([_image(8, 6, seed) for seed in range(2)]))
    x = ModelInput(MEAN, STD, channels_last=True)(images)
    assert x.shape == (2, 3, 8, 6) and x.is_contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    torch.testing.assert_close(x, ModelInput(MEAN, STD)(images), rtol=0, atol=0)


def test_model_input_leaves_its_input_alone():
    images = torch.rand(1, 4, 4, 3) * 255  # float input must not be scaled in place
    before = images.clone()
    ModelInput(MEAN, STD)(images)
    torch.testing.assert_close(images, before, rtol=0, atol=0)


def test_model_input_builds_its_statistics_once_on_the_device():
    """A training step must not copy mean and std from Python lists to the GPU each time: they are device tensors
    made when the transform is, and a call creates no tensor from Python data."""
    transform = ModelInput(MEAN, STD, device="meta")
    assert transform.mean.device.type == "meta" and transform.std.device.type == "meta"
    images = torch.from_numpy(np.stack([_image(8, 6, 0)]))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ModelInput(MEAN, STD)(images)
    made_at_construction = {e.key for e in prof.key_averages()}
    transform = ModelInput(MEAN, STD)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        transform(images)
    per_call = {e.key for e in prof.key_averages()}
    assert "aten::lift_fresh" in made_at_construction and "aten::lift_fresh" not in per_call
