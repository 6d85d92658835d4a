"""Speech inputs of the encoder: stacked fbank frames through a projection, a LayerNorm and
a mask embedding (``modalities/embedder.py``), then wav2vec2/HuBERT's convolutional
position embedding (``GELU(conv(x))``, added) over each utterance alone: it never mixes
two utterances of a packed batch. Masked frames get their neighbours' content through
it, as in HuBERT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..embedder import FeatureEmbedder


class SpeechEmbedder(FeatureEmbedder):
    def __init__(self, feature_dim: int, dim: int, conv_kernel: int = 15, conv_groups: int = 16,
                 eps: float = 1e-12) -> None:
        super().__init__(feature_dim, dim, eps)
        if conv_kernel and conv_kernel % 2 == 0:
            raise ValueError(f"model.speech_conv_kernel must be odd, got {conv_kernel}")
        self.conv = (nn.Conv1d(dim, dim, conv_kernel, padding=conv_kernel // 2,
                               groups=conv_groups) if conv_kernel else None)

    def forward(self, feats: torch.Tensor, runs: torch.Tensor,
                masked: torch.Tensor | None = None) -> torch.Tensor:
        """[n, feature_dim] -> [n, dim]; ``runs`` [n]: one id per utterance (equal ids are
        contiguous), the convolution sees each run alone; ``masked`` [n] bool."""
        h = super().forward(feats, masked)
        if self.conv is None:
            return h
        cuts = (torch.nonzero(runs[1:] != runs[:-1]).flatten() + 1).tolist()
        return h + torch.cat([F.gelu(self.conv(x.T[None])[0].T)
                              for x in torch.tensor_split(h, cuts)])
