"""The backbone zoo: every preset builds and trains, its taps and preprocessing, and pretrained loading errors."""

from __future__ import annotations

import dataclasses

import huggingface_hub.constants
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from torch import nn

from mlcls_ray.config import ConfigError, list_presets, load_config
from mlcls_ray.models.zoo import ModelSpec, PretrainedError, build_model, is_weight_file
from mlcls_ray.train.run import model_spec

CLIP = "CLIP_vit_base_patch16_448_ML"
# preset -> (tokens the head reads at 64 px, their width): CNNs give a 2x2 map, the ViT its 4x4 patch tokens
HEAD_INPUT = {
    CLIP: (16, 768),  # (64/16)^2 patch tokens, no CLS token
    "PP-HGNetV2-B0_ML": (4, 2048),  # head.last_conv, not the 1024-channel features
    "PP-HGNetV2-B4_ML": (4, 2048),
    "PP-HGNetV2-B6_ML": (4, 2048),
    "PP-LCNet_x1_0_ML": (4, 1280),  # conv_head, not the 512-channel features
    "ResNet50_ML": (4, 2048),
}


def _preset_spec(preset: str, num_classes: int = 5) -> ModelSpec:
    cfg = load_config(preset, ["Train.image_size=64"], check_paths=False)
    return model_spec(cfg, num_classes=num_classes)


def _tiny_spec(backbone: str = "resnet18", num_classes: int = 3) -> ModelSpec:
    return ModelSpec.create(name=f"{backbone}_ML", backbone=backbone, tap="features", num_classes=num_classes,
                            image_size=32, embed_dim=32, num_heads=2, ffn_dim=64)


def test_the_table_covers_every_preset():
    assert sorted(HEAD_INPUT) == list_presets()


@pytest.mark.parametrize("preset", sorted(HEAD_INPUT))
def test_preset_trains_at_64px(preset):
    spec = _preset_spec(preset)
    torch.manual_seed(0)
    model, notes = build_model(spec)  # no pretrained weights: nothing to fetch
    assert notes == []
    seen = []
    model.head.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))  # what the head reads
    x = torch.randn(2, 3, 64, 64)
    logits = model(x)  # [2, 5]
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    assert seen[0].shape == (2, *HEAD_INPUT[preset])
    if preset == CLIP:  # every patch token, after the final norm, and not the CLS token
        with torch.no_grad():
            tokens = model.tokens(x)  # [2, 16, 768]
            features = model.backbone.forward_features(x)  # [2, 1 + 16, 768]: CLS first
        assert tokens.shape == (2, 16, 768)
        torch.testing.assert_close(tokens, features[:, 1:], rtol=0, atol=0)

    F.binary_cross_entropy_with_logits(logits, torch.tensor([[1.0, 0, 0, 1, 0], [0, 1, 0, 0, 0]])).backward()
    first = next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d))  # stem / patch embedding
    for name, weight in [("backbone's first conv", first.weight), ("head.proj", model.head.proj.weight),
                         ("head.group_weight", model.head.group_weight)]:
        assert weight.grad is not None and torch.isfinite(weight.grad).all(), name
        assert weight.grad.abs().sum() > 0, f"no gradient reaches the {name}"


@pytest.mark.parametrize("preset", sorted(HEAD_INPUT))
def test_preset_normalisation_is_the_backbones_own(preset):
    spec = _preset_spec(preset)
    mean, std = (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD) if preset == CLIP else (IMAGENET_DEFAULT_MEAN,
                                                                           IMAGENET_DEFAULT_STD)
    assert spec.mean == pytest.approx(mean) and spec.std == pytest.approx(std)
    if preset == CLIP:
        assert spec.mean == pytest.approx((0.4815, 0.4578, 0.4082), abs=1e-4)


def test_any_timm_backbone_loads_through_the_generic_recipe():
    cfg = load_config("resnet18_ML", check_paths=False)
    assert cfg["Global.model"] == "resnet18_ML" and cfg["Arch.backbone"] == "resnet18"
    assert cfg["Train.pretrain_weight_path"] is None  # the recipe assumes no hub tag
    assert "_timm_ML" not in list_presets()


def test_unknown_name_lists_close_matches():
    with pytest.raises(ConfigError) as err:
        load_config("resnet5O_ML", check_paths=False)  # letter O, not zero
    assert "resnet5O_ML" in str(err.value) and "resnet50_ML" in str(err.value)


def test_weight_file_or_hub_tag():
    assert is_weight_file("w.pth") and is_weight_file("s3://bucket/w") and is_weight_file("dir/w")
    assert not is_weight_file("openai") and not is_weight_file("a1_in1k")


# --- pretrained weights from files ---

def _saved_resnet18(seed: int = 123, classifier: bool = False) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return timm.create_model("resnet18", num_classes=1000 if classifier else 0).state_dict()


def _write(state: dict[str, torch.Tensor], path) -> str:
    if str(path).endswith(".safetensors"):
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return str(path)


@pytest.mark.parametrize("name, classifier", [("backbone.safetensors", False), ("backbone.pth", False),
                                              ("timm_full.pth", True)])  # a timm checkpoint with its fc layer
def test_backbone_file_loads(tmp_path, name, classifier):
    saved = _saved_resnet18(classifier=classifier)
    path = _write(saved, tmp_path / name)
    model, notes = build_model(_tiny_spec(), path)
    own = model.backbone.state_dict()
    for key, value in own.items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0, msg=key)
    assert notes == [f"loaded pretrained weights from {path}"]
    torch.manual_seed(0)
    fresh, _ = build_model(_tiny_spec())
    assert not torch.equal(fresh.backbone.conv1.weight, saved["conv1.weight"])


def test_backbone_file_under_other_names_is_refused(tmp_path):
    """timm loads non-strictly; a file whose names all miss (a wrapper's prefix) must not pass as pretrained."""
    path = _write({f"model.{k}": v for k, v in _saved_resnet18().items()}, tmp_path / "lightning.safetensors")
    with pytest.raises(PretrainedError) as err:
        build_model(_tiny_spec(), path)
    msg = str(err.value)
    assert path in msg and "model.conv1.weight" in msg and "conv1.weight" in msg and "\n" not in msg


def test_backbone_file_of_another_architecture_is_refused_on_one_line(tmp_path):
    torch.manual_seed(0)
    path = _write(timm.create_model("resnet50", num_classes=0).state_dict(), tmp_path / "r50.safetensors")
    with pytest.raises(PretrainedError) as err:
        build_model(_tiny_spec(), path)
    msg = str(err.value)
    assert path in msg and "does not fit resnet18" in msg and "\n" not in msg and len(msg) < 700


def test_whole_model_file_loads_backbone_and_skips_head_of_other_class_count(tmp_path):
    torch.manual_seed(1)
    five, _ = build_model(_tiny_spec(num_classes=5))
    path = _write(five.state_dict(), tmp_path / "model.safetensors")  # what a model folder holds
    torch.manual_seed(2)
    three, notes = build_model(_tiny_spec(num_classes=3), path)
    for key, value in five.backbone.state_dict().items():
        torch.testing.assert_close(three.backbone.state_dict()[key], value, rtol=0, atol=0, msg=key)
    # the head's class-sized tensors are skipped, the rest of the head (same shapes) loads
    assert three.head.group_bias.shape == (3,) and three.head.query_embed.shape == (3, 32)
    assert not torch.equal(three.head.query_embed, five.head.query_embed[:3])
    torch.testing.assert_close(three.head.proj.weight, five.head.proj.weight, rtol=0, atol=0)
    assert any("skipped" in n and "head.group_bias" in n for n in notes), notes
    assert notes[-1] == f"loaded pretrained weights from {path}"


def test_whole_model_of_another_backbone_is_refused(tmp_path):
    torch.manual_seed(1)
    vit, _ = build_model(_tiny_spec("test_vit"))
    path = _write(vit.state_dict(), tmp_path / "model.safetensors")
    with pytest.raises(PretrainedError, match="none of its backbone tensors fit resnet18"):
        build_model(_tiny_spec(), path)


@pytest.mark.parametrize("name", ["garbage.safetensors", "garbage.pth"])
def test_garbage_file_names_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"these are not weights\n" * 8)
    with pytest.raises(PretrainedError) as err:
        build_model(_tiny_spec(), str(path))
    assert str(path) in str(err.value) and "not a safetensors or torch state dict" in str(err.value)


def test_missing_file_names_the_file(tmp_path):
    path = str(tmp_path / "nowhere" / "w.safetensors")
    with pytest.raises(PretrainedError, match="not found") as err:
        build_model(_tiny_spec(), path)
    assert path in str(err.value)


# --- pretrained weights from the hub ---

def test_offline_hub_says_what_to_pass_instead(tmp_path, monkeypatch):
    tag = "a1_in1k"
    assert f"resnet18.{tag}" in timm.list_pretrained("resnet18.*")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these at import; an empty cache means no weights were downloaded before
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(PretrainedError) as err:
        build_model(_tiny_spec(), tag)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"cannot fetch resnet18.{tag} from the model hub" in msg and "offline" in msg
    assert "-o Train.pretrain_weight_path=/path" in msg and "-o Train.pretrain_weight_path=None" in msg
    assert "-c resnet18_ML" not in msg  # already the from-scratch recipe

    # a preset fine-tunes at 1e-4 with cosine: from scratch the user is pointed at the generic recipe
    with pytest.raises(PretrainedError) as err:
        build_model(dataclasses.replace(_tiny_spec(), name="ResNet18_preset_ML"), tag)
    assert "-o Train.pretrain_weight_path=None to train from scratch (with -c resnet18_ML," in str(err.value)


def test_unknown_hub_tag_lists_the_available_tags():
    with pytest.raises(PretrainedError) as err:
        build_model(_tiny_spec(), "not_a_tag")
    msg = str(err.value)
    assert "'not_a_tag' is not a pretrained tag of resnet18" in msg
    for name in timm.list_pretrained("resnet18.*"):
        assert name.split(".", 1)[1] in msg


def test_eval_scores_in_fp32_under_bf16_autocast():
    """bf16 logits tie (about 80 distinct values in 256 rows) and shift mAP; in eval the head runs in fp32."""
    spec = ModelSpec.create(name="t", backbone="test_resnet", tap="features", num_classes=3, image_size=32,
                            embed_dim=32, ffn_dim=64, num_heads=2)
    model, _ = build_model(spec)
    model.eval()
    x = torch.randn(256, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert logits.dtype == torch.float32
    assert all(len(torch.unique(logits[:, c])) > 200 for c in range(3))
