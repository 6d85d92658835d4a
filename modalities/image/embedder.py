"""Image inputs of the encoder: feature vectors (VQ latents or patch-encoder tokens) through
a projection, a LayerNorm and a mask embedding (``modalities/embedder.py``).

The VQ codebook lives here as a buffer (data from the image tokenizer, not a learned
weight): with ``model.image_code_input=features`` VQ code ids (CM3 documents, generation)
enter as their code vectors through the same projection and norm, the path the latents
take in the other objectives, and the MRC head scores against it.

This is the seam for other image inputs (``model.image_input``: ``vq_latents`` and
``patch_encoder`` features today; a ``pixels`` encoder would be another embedder giving
the same [n, dim] rows); none is built here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..embedder import FeatureEmbedder


class ImageEmbedder(FeatureEmbedder):
    def __init__(self, feature_dim: int, dim: int, codes: int, code_dim: int,
                 eps: float = 1e-12) -> None:
        super().__init__(feature_dim, dim, eps)
        self.register_buffer("codebook", F.normalize(torch.randn(codes, code_dim), dim=-1))

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """VQ code ids [n] (0-based) -> [n, dim] through their code vectors."""
        return self(self.codebook[codes])
