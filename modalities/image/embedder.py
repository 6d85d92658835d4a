"""Image inputs of the encoder (``model.image_input``): feature vectors (VQ latents or
patch-encoder tokens) through a projection, a LayerNorm and a mask embedding
(``modalities/embedder.py``), or uint8 pixels through the trainable ``ImageEncoder``
(``encoder.py``), whose tokens take the same LayerNorm and mask embedding.

Masked pixels (MRFR, MRC, MIM) are blanked in the image before the encoder, whose
convolutions would otherwise carry a masked patch into its neighbours' tokens, and their
tokens are then replaced by the mask embedding after the norm (SimMIM for conv encoders).

The VQ codebook lives here as a buffer (data from the image tokenizer, not a learned
weight): with ``model.image_code_input=features`` VQ code ids (CM3 documents, generation)
enter as their code vectors through the projection and the norm, and the MRC head scores
against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omnimask.errors import OmnimaskError

from ..embedder import FeatureEmbedder
from .encoder import ImageEncoder, ImageEncoderConfig


class ColorPath(nn.Module):
    """uint8 pixels [B, 3, S, S] -> [B, grid * grid, dim]: per-pixel features (two 1x1
    convolutions: nothing of a pixel's neighbours, so no shape), max-pooled over each
    token's patch (a patch holding a few pixels of a colour shows it), projected from zero
    (a model gaining the path starts out unchanged)."""

    def __init__(self, width: int, dim: int, grid: int) -> None:
        super().__init__()
        self.grid = grid
        self.pixel = nn.Sequential(nn.Conv2d(3, width, 1), nn.GELU(), nn.Conv2d(width, width, 1))
        self.proj = nn.Linear(width, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(self.proj.weight.dtype) / 127.5 - 1.0
        f = F.adaptive_max_pool2d(self.pixel(x), self.grid)  # [B, width, grid, grid]
        return self.proj(f.flatten(2).transpose(1, 2))


class ImageEmbedder(FeatureEmbedder):
    def __init__(self, feature_dim: int, dim: int, codes: int, code_dim: int,
                 eps: float = 1e-12, encoder: ImageEncoderConfig | None = None,
                 color_path: int = 0) -> None:
        super().__init__(feature_dim, dim, eps)
        self.register_buffer("codebook", F.normalize(torch.randn(codes, code_dim), dim=-1))
        self.encoder = ImageEncoder(encoder) if encoder is not None else None
        self.color = (ColorPath(color_path, dim, encoder.grid)
                      if color_path and encoder is not None else None)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """VQ code ids [n] (0-based) -> [n, dim] through their code vectors."""
        return self(self.codebook[codes])

    def embed_pixels(self, pixels: torch.Tensor, masked: torch.Tensor | None = None,
                     maps: list | None = None, tag_words: list | None = None) -> torch.Tensor:
        """uint8 images [k, 3, S, S] -> [k * grid * grid, dim] tokens (image by image, raster
        order); ``masked`` [k * grid * grid] bool: those patches are blanked before the
        encoder and their tokens become the mask embedding after the norm; ``maps``: a list
        that receives the encoder's feature maps (finest first, [k, C, H, W] each);
        ``tag_words``: per tag classifier of the encoder, its classes' word vectors
        [classes, dim]: each token adds them weighted by its predicted class probabilities."""
        if self.encoder is None:
            raise OmnimaskError("this model reads image features, not pixels (model."
                                "image_input is not pixels); give image segments features")
        k, g = pixels.shape[0], self.encoder.cfg.grid
        blank = None
        if masked is not None:
            if masked.shape != (k * g * g,):
                raise OmnimaskError(f"{k} images of {g}x{g} tokens take a mask of "
                                    f"{k * g * g} flags, got {tuple(masked.shape)}")
            blank = masked.view(k, g, g)
        out = self.encoder(pixels, blank)
        if maps is not None:
            maps.extend(out.maps)
        tokens = out.tokens.flatten(0, 1)
        h = self.norm(tokens)
        for probs, words in zip(out.tags, tag_words or ()):
            h = h + (probs.flatten(0, 1) @ words.float()).to(h.dtype)
        if self.color is not None:  # a masked patch's token is replaced below: nothing leaks
            h = h + self.color(pixels).flatten(0, 1).to(h.dtype)
        if masked is not None:
            h = torch.where(masked.to(h.device)[:, None], self.mask_embed.to(h.dtype), h)
        return h
