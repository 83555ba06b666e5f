"""ML-Decoder head: shapes, the vectorised group FC against a loop, frozen saved queries, the layer maths, autocast."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mlcls_ray.models.ml_decoder import MLDecoder

SMALL = dict(embed_dim=32, num_heads=4, ffn_dim=64)


def _head(num_classes: int = 10, in_features: int = 24, **kwargs) -> MLDecoder:
    torch.manual_seed(0)
    return MLDecoder(num_classes, in_features, **{**SMALL, **kwargs})


@pytest.mark.parametrize(
    "num_classes, num_queries, k, g",
    [(80, 100, 80, 1), (10, 4, 4, 3), (1, 100, 1, 1), (9605, 200, 200, 49)],
)
def test_queries_groups_and_output_shapes(num_classes, num_queries, k, g):
    head = _head(num_classes, num_queries=num_queries).eval()
    assert (head.num_queries, head.group_size) == (k, g)
    assert head.query_embed.shape == (k, SMALL["embed_dim"])
    assert head.group_weight.shape == (k, SMALL["embed_dim"], g) and head.group_bias.shape == (num_classes,)
    tokens = torch.randn(3, 5, 24)
    assert head(tokens).shape == (3, num_classes)
    fmap = torch.randn(2, 24, 3, 4)
    assert head(fmap).shape == (2, num_classes)
    # a [B, C, H, W] map is the token sequence [B, HW, C]
    torch.testing.assert_close(head(fmap), head(fmap.flatten(2).transpose(1, 2)), rtol=0, atol=0)


def test_bad_input_rank_and_sizes_raise():
    with pytest.raises(ValueError, match="tokens"):
        _head()(torch.randn(2, 24))
    with pytest.raises(ValueError):
        MLDecoder(0, 24)


def test_init_statistics_match_official():
    torch.manual_seed(0)
    head = MLDecoder(80, 64)  # official sizes: embed 768, K = 80, g = 1
    assert head.query_embed.std().item() == pytest.approx(1.0, rel=0.05)
    xavier_std = math.sqrt(2.0 / (768 * 1 + 80 * 1))  # fan_in = D*g, fan_out = K*g
    assert head.group_weight.std().item() == pytest.approx(xavier_std, rel=0.05)
    assert torch.count_nonzero(head.group_bias) == 0


@pytest.mark.parametrize("num_classes, num_queries", [(10, 4), (12, 12), (7, 3)])
def test_group_fc_equals_per_query_loop(num_classes, num_queries):
    head = _head(num_classes, num_queries=num_queries).eval()
    with torch.no_grad():
        head.group_bias.normal_()
        tokens = torch.randn(4, 6, 24)
        hidden = head.forward_features(tokens)
        assert hidden.shape == (4, head.num_queries, SMALL["embed_dim"])
        per_query = [hidden[:, k, :] @ head.group_weight[k] for k in range(head.num_queries)]  # each [B, g]
        expected = torch.cat(per_query, dim=1)[:, :num_classes] + head.group_bias
        torch.testing.assert_close(head.group_fc(hidden), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(head(tokens), expected, rtol=0, atol=1e-6)


def test_queries_are_saved_frozen_and_untouched_by_the_optimiser():
    head = _head().train()
    assert "query_embed" in head.state_dict()
    head.requires_grad_(True)  # e.g. code that unfreezes a whole model must not unfreeze the queries
    params = list(head.parameters())
    assert all(p is not head.query_embed for p in params) and not head.query_embed.requires_grad
    queries = head.query_embed.clone()
    before = {name: p.detach().clone() for name, p in head.named_parameters()}
    optimiser = torch.optim.AdamW(params, lr=1e-2)
    head(torch.randn(4, 6, 24)).pow(2).sum().backward()
    optimiser.step()
    torch.testing.assert_close(head.query_embed, queries, rtol=0, atol=0)
    unchanged = [name for name, p in head.named_parameters() if torch.equal(p, before[name])]
    assert unchanged == []


def test_self_attention_replacement_is_layernorm_of_q_plus_q():
    head = _head().eval()
    layer = head.layers[0]
    with torch.no_grad():
        layer.norm1.weight.normal_()
        layer.norm1.bias.normal_()
    seen = []
    layer.multihead_attn.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    q, memory = torch.randn(2, 5, 32), torch.randn(2, 6, 32)
    with torch.no_grad():
        layer(q, memory)
    torch.testing.assert_close(seen[0], layer.norm1(q + q), rtol=0, atol=0)
    expected = F.layer_norm(q, (32,), layer.norm1.weight, layer.norm1.bias, eps=1e-5)  # LN(2q) = LN(q) up to eps
    torch.testing.assert_close(seen[0], expected, rtol=1e-4, atol=1e-4)


def test_eval_is_deterministic_and_train_dropout_is_not():
    head = _head(dropout=0.1)
    tokens = torch.randn(3, 6, 24)
    with torch.no_grad():
        head.eval()
        torch.testing.assert_close(head(tokens), head(tokens), rtol=0, atol=0)
        head.train()
        assert not torch.equal(head(tokens), head(tokens))


def test_state_dict_round_trip_reproduces_outputs():
    head = _head(num_layers=2).eval()
    torch.manual_seed(123)
    fresh = MLDecoder(10, 24, num_layers=2, **SMALL).eval()
    tokens = torch.randn(2, 6, 24)
    with torch.no_grad():
        assert not torch.allclose(fresh(tokens), head(tokens))
        fresh.load_state_dict(head.state_dict())
        torch.testing.assert_close(fresh(tokens), head(tokens), rtol=0, atol=0)


def test_bf16_autocast_runs_in_bf16_and_backward_works():
    head = _head().train()
    dtypes = []
    head.proj.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(torch.randn(2, 24, 3, 3))
    assert dtypes == [torch.bfloat16]  # the head is not forced to fp32
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    logits.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())


def test_whole_module_in_bf16():
    head = _head().to(torch.bfloat16).eval()
    assert head.query_embed.dtype == torch.bfloat16
    with torch.no_grad():
        assert head(torch.randn(2, 6, 24, dtype=torch.bfloat16)).dtype == torch.bfloat16


def _official_forward(head: MLDecoder, x: torch.Tensor) -> torch.Tensor:
    """The official ML-Decoder forward (Alibaba-MIIL/ML_Decoder, ``MLDecoder.forward`` with
    ``TransformerDecoderLayerOptimal`` and the ``GroupFC`` loop), transcribed line by line in its own sequence-first
    layout and run on ``head``'s weights under the official names. ``nn.TransformerDecoder`` is bypassed because it
    crashes on torch 2.14; it only loops over the layers."""
    embedding_spatial = x.flatten(2).transpose(1, 2) if x.dim() == 4 else x
    embedding_spatial_786 = F.relu(F.linear(embedding_spatial, head.proj.weight, head.proj.bias))  # embed_standart
    bs = embedding_spatial_786.shape[0]
    tgt = head.query_embed.unsqueeze(1).expand(-1, bs, -1)  # query_embed.weight: [K, bs, D]
    memory = embedding_spatial_786.transpose(0, 1)
    for layer in head.layers:
        attn = torch.nn.MultiheadAttention(tgt.shape[-1], layer.multihead_attn.num_heads)  # sequence-first
        attn.load_state_dict(layer.multihead_attn.state_dict())
        attn.eval()
        tgt = layer.norm1(tgt + tgt)  # tgt = tgt + dropout1(tgt); tgt = norm1(tgt)
        tgt = layer.norm2(tgt + attn(tgt, memory, memory)[0])
        tgt = layer.norm3(tgt + layer.linear2(F.relu(layer.linear1(tgt))))
    h = tgt.transpose(0, 1)  # [bs, K, D]
    out_extrap = torch.zeros(h.shape[0], h.shape[1], head.group_size)
    for i in range(h.shape[1]):  # GroupFC
        out_extrap[:, i, :] = torch.matmul(h[:, i, :], head.group_weight[i, :, :])
    return out_extrap.flatten(1)[:, :head.num_classes] + head.group_bias  # duplicate_pooling_bias


@pytest.mark.parametrize("num_classes, num_queries", [(80, 100), (23, 5)])
def test_the_same_weights_give_the_official_logits(num_classes, num_queries):
    head = _head(num_classes, num_queries=num_queries).eval()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))  # away from the initial LayerNorm and bias values
        fmap = torch.randn(3, 24, 4, 5)
        torch.testing.assert_close(head(fmap), _official_forward(head, fmap), rtol=1e-5, atol=1e-5)
