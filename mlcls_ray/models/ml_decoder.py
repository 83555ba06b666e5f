"""ML-Decoder classification head (Ridnik et al., "ML-Decoder: Scalable and Versatile Classification Head",
arXiv 2111.12933), written in the project because the official code and timm's copy crash on torch 2.14.

A feature map or token sequence is projected to ``embed_dim`` (Linear + ReLU, no positional encoding), K frozen
random queries cross-attend to it through one or more post-norm decoder layers, and a group FC maps each query to
``g = ceil(num_classes / K)`` logits. Deviations from the official code, none of which changes the maths:

- batch-first tensors throughout, and the layers are called directly instead of through ``nn.TransformerDecoder``;
- the self-attention block is removed as in the official ``TransformerDecoderLayerOptimal``: ``LN1(q + drop(q))``;
- the group FC is one ``einsum`` instead of a scripted loop over the K queries.

Layer attribute names (``multihead_attn``, ``linear1``, ``norm1``...) follow the official layer so that converting
its weights is a rename.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MLDecoder"]


class _DecoderLayer(nn.Module):
    """One post-norm decoder layer without self-attention: residual+LN, cross-attention, FFN (ReLU)."""

    def __init__(self, embed_dim: int, num_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(embed_dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, embed_dim)
        self.norm1 = nn.LayerNorm(embed_dim, eps=1e-5)
        self.norm2 = nn.LayerNorm(embed_dim, eps=1e-5)
        self.norm3 = nn.LayerNorm(embed_dim, eps=1e-5)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, memory: Tensor) -> Tensor:
        """``tgt`` ``[B, K, D]`` queries, ``memory`` ``[B, N, D]`` tokens -> ``[B, K, D]``."""
        tgt = self.norm1(tgt + self.dropout1(tgt))  # self-attention replaced by a residual, as in the official code
        attn = self.multihead_attn(tgt, memory, memory, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attn))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(ffn))


class MLDecoder(nn.Module):
    """ML-Decoder head: ``[B, N, in_features]`` tokens (or a ``[B, C, H, W]`` map) -> ``[B, num_classes]`` logits.

    ``num_queries`` is capped at ``num_classes`` (K); each query produces ``group_size = ceil(num_classes / K)``
    logits and the surplus of the last group is cut off.
    """

    def __init__(
        self,
        num_classes: int,
        in_features: int,
        *,
        num_queries: int = 100,
        embed_dim: int = 768,
        num_layers: int = 1,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if num_classes < 1 or num_queries < 1 or num_layers < 1:
            raise ValueError(f"num_classes, num_queries and num_layers must be >= 1, got "
                             f"{num_classes}, {num_queries}, {num_layers}")
        self.num_classes = num_classes
        self.num_queries = min(num_queries, num_classes)
        self.group_size = math.ceil(num_classes / self.num_queries)
        self.proj = nn.Linear(in_features, embed_dim)
        # A persistent buffer rather than a frozen Parameter: it is saved by state_dict() and follows .to()/.half(),
        # but it never reaches model.parameters(), so no optimiser, weight decay, EMA of parameters or a later
        # model.requires_grad_(True) (e.g. when unfreezing a backbone) can train it by accident.
        self.register_buffer("query_embed", torch.randn(self.num_queries, embed_dim))
        self.layers = nn.ModuleList(_DecoderLayer(embed_dim, num_heads, ffn_dim, dropout) for _ in range(num_layers))
        self.group_weight = nn.Parameter(torch.empty(self.num_queries, embed_dim, self.group_size))
        self.group_bias = nn.Parameter(torch.zeros(num_classes))
        nn.init.xavier_normal_(self.group_weight)  # fans from the 3-D shape: embed_dim*g in, K*g out (as official)

    def forward_features(self, tokens: Tensor) -> Tensor:
        """Decode: ``[B, N, in_features]`` or ``[B, C, H, W]`` -> per-query embeddings ``[B, K, embed_dim]``."""
        if tokens.dim() == 4:
            tokens = tokens.flatten(2).transpose(1, 2)
        if tokens.dim() != 3:
            raise ValueError(f"expected [B, N, C] tokens or a [B, C, H, W] map, got shape {tuple(tokens.shape)}")
        memory = F.relu(self.proj(tokens))
        tgt = self.query_embed.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        for layer in self.layers:
            tgt = layer(tgt, memory)
        return tgt

    def group_fc(self, hidden: Tensor) -> Tensor:
        """Group FC: query k's embedding times its own ``[embed_dim, g]`` weight -> ``[B, num_classes]``."""
        logits = torch.einsum("bkd,kdg->bkg", hidden, self.group_weight)
        return logits.reshape(hidden.shape[0], -1)[:, : self.num_classes] + self.group_bias

    def forward(self, tokens: Tensor) -> Tensor:
        """``[B, N, in_features]`` tokens or a ``[B, C, H, W]`` map -> ``[B, num_classes]`` logits."""
        return self.group_fc(self.forward_features(tokens))
