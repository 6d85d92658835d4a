"""Speech codebooks: a frozen BEST-RQ random-projection quantizer and k-means units.

BEST-RQ (Chiu et al. 2022; speechbrain's ``quantisers.py``): a Xavier-initialised
projection to a small dimension and a Gaussian codebook, both l2-normalised, frozen and
made from a seed; a frame's unit is the nearest codeword (the largest cosine).
HuBERT-style units: k-means (``omnimask.modalities.kmeans``) fitted on the same features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kmeans import assign, kmeans


class BestRQ(torch.nn.Module):
    def __init__(self, input_dim: int, codebook_size: int = 1024, code_dim: int = 16,
                 seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        proj = torch.empty(input_dim, code_dim)
        bound = (6.0 / (input_dim + code_dim)) ** 0.5  # Xavier uniform
        proj.uniform_(-bound, bound, generator=g)
        codebook = F.normalize(torch.randn(codebook_size, code_dim, generator=g), dim=-1)
        self.register_buffer("projection", proj)  # buffers: nothing here is trainable
        self.register_buffer("codebook", codebook)

    @property
    def size(self) -> int:
        return self.codebook.shape[0]

    @torch.no_grad()
    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """[..., input_dim] -> [...] unit ids."""
        z = F.normalize(feats.float() @ self.projection, dim=-1)
        return (z @ self.codebook.T).argmax(-1)


class KMeansUnits(torch.nn.Module):
    def __init__(self, centroids: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("centroids", centroids)

    @property
    def size(self) -> int:
        return self.centroids.shape[0]

    @torch.no_grad()
    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        shape = feats.shape[:-1]
        return assign(feats.reshape(-1, feats.shape[-1]).float(), self.centroids)[0].reshape(shape)

    @classmethod
    def fit(cls, x: torch.Tensor, k: int, iterations: int = 25, seed: int = 0,
            progress: bool = True) -> tuple[KMeansUnits, dict]:
        centroids, stats = kmeans(x, k, iterations, seed, progress=progress)
        return cls(centroids), stats
