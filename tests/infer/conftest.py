"""A tiny model folder, saved by the tests themselves (no hub): timm's test_resnet with a small ML-Decoder head."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mlcls_ray import model_dir
from mlcls_ray.models.zoo import ModelSpec, build_model
from tests.helpers import QUADRANT_NAMES

TINY_THRESHOLDS = [0.5, 0.45, 0.55, 0.5]


def save_tiny_model(folder: Path, seed: int = 0) -> str:
    spec = ModelSpec.create(name="test_resnet_ML", backbone="test_resnet", tap="features", num_classes=4,
                            image_size=32, embed_dim=64, ffn_dim=128, num_heads=2)
    torch.manual_seed(seed)
    model, _ = build_model(spec)
    model_dir.save(str(folder), spec, model.state_dict(), QUADRANT_NAMES, TINY_THRESHOLDS, extra={"seed": seed})
    return str(folder)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A model folder (``model.safetensors`` + ``inference.yml``) of 4 classes at 32 px, random weights."""
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")
