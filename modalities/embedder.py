"""What the continuous-input embedders of every modality share (``<m>/embedder.py``).

A linear projection to the trunk's width and a LayerNorm (UNITER's image embedding:
without the norm, small random projections leave every image looking alike next to the
position embeddings). A masked position is replaced after the norm by a learned mask
embedding (HuBERT's ``mask_emb``; UNITER MRM zeroes the feature instead): a zeroed feature
through the LayerNorm blows up the input bias's gradient, and nothing of a masked feature
reaches the trunk.
"""

from __future__ import annotations

import torch
from torch import nn


class FeatureEmbedder(nn.Module):
    def __init__(self, feature_dim: int, dim: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.proj = nn.Linear(feature_dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mask_embed = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)
        nn.init.normal_(self.mask_embed, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"mask_embed"}  # a row of an embedding table, not a linear map

    def forward(self, feats: torch.Tensor, masked: torch.Tensor | None = None) -> torch.Tensor:
        """[n, feature_dim] -> [n, dim]; ``masked`` [n] bool rows become the mask embedding."""
        h = self.norm(self.proj(feats.to(self.proj.weight)))
        if masked is not None:
            h = torch.where(masked.to(h.device)[:, None], self.mask_embed.to(h.dtype), h)
        return h
