"""A trainable image encoder from uint8 pixels: our small conv stem, or any timm backbone.

It returns the token grid the trunk reads (``grid`` x ``grid`` tokens of width ``dim`` in
raster order, the order of the VQ codes, so MIM/MRC targets align position by position)
and the higher-resolution feature maps a segmentation head needs. Trained end to end with
the trunk; the frozen VQ latents and the frozen timm patch encoder stay the alternatives.

``backbone="conv"`` is our stem: a stride-1 3x3 conv at full resolution, then one stage
per halving of the side (a stride-2 3x3 conv, then ``depth - 1`` residual stride-1 3x3
convs, each Conv-Norm-GELU), then a 1x1 projection to ``dim``. Small objects survive the
early layers; the depth resolves shape identity.

Any other name is a timm model built with ``features_only=True`` and ``pretrained=False``:
random initialisation, nothing is ever downloaded. The tokens come from the deepest stage
whose map is still at least ``grid`` wide (adaptive-average-pooled to ``grid`` if wider);
deeper stages are not built. timm backbones keep their own norm layers and take their
``pretrained_cfg`` mean/std; ``channels``, ``stem_channels``, ``depth``, ``norm`` and
``groups`` shape only our stem.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from omnimask.config import check_choice, check_fields
from omnimask.errors import OmnimaskError

PREFIX = "model.image_encoder."  # where the config sits in a pretraining config
NORMS = ("batchnorm", "groupnorm", "none")


@dataclass
class ImageEncoderConfig:
    backbone: str = "conv"  # "conv" (ours) or a timm model name
    dim: int = 256  # output token width: the trunk's
    image_size: int = 64
    grid: int = 8  # output token grid side: 8x8 tokens at 64 px, the VQ grid
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])  # per stride-2 stage
    stem_channels: int = 16  # the full-resolution stride-1 conv; 0: none
    depth: int = 2  # convs per stage: one stride-2, then depth-1 residual stride-1
    # batchnorm | groupnorm | none (our stem only). BatchNorm learned shapes faster from few
    # images (docs/experiments/2026-11-29-pixel-encoder.md); GroupNorm: batch-independent
    norm: str = "batchnorm"
    groups: int = 8  # GroupNorm groups (gcd with each width, so any width works)
    # parameters fixed and norms in eval mode (no gradients, running statistics kept): an
    # encoder that has learned what to see (pretraining's encoder_warmup) keeps it
    frozen: bool = False
    # region tags (OSCAR's object tags): one linear classifier per list over the tokens,
    # each class named by a word ("" for none, e.g. the background); the model adds the
    # predicted words' embeddings to each token. Set by encoder_warmup.tags
    tags: list[list[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        p = PREFIX
        check_fields(self, ">=1", "dim", "image_size", "grid", "depth", "groups", prefix=p)
        check_fields(self, ">=0", "stem_channels", prefix=p)
        if not isinstance(self.backbone, str) or not self.backbone:
            raise ValueError(f"{p}backbone must be 'conv' or a timm model name, got "
                             f"{self.backbone!r}")
        check_choice(self, "norm", NORMS, prefix=p)
        if self.grid > self.image_size or self.image_size % self.grid:
            raise ValueError(f"{p}grid must divide image_size ({self.image_size}), got "
                             f"{self.grid}")
        self.tags = [[str(w) for w in words] for words in self.tags]
        if any(len(words) < 2 for words in self.tags):
            raise ValueError(f"{p}tags: each tag classifier needs at least 2 class words, got "
                             f"{self.tags}")
        if self.backbone == "conv":
            ratio = self.image_size // self.grid
            stages = ratio.bit_length() - 1
            if ratio < 2 or ratio != 1 << stages:
                raise ValueError(f"{p}grid must be image_size ({self.image_size}) over a power "
                                 f"of 2 >= 2 for the conv stem, got {self.grid}")
            if len(self.channels) != stages or min(self.channels) < 1:
                raise ValueError(f"{p}channels must be {stages} sizes >= 1 (one per stride-2 "
                                 f"stage, {self.image_size} -> {self.grid}), got "
                                 f"{list(self.channels)}")
        else:
            import timm  # only for a timm backbone: importing it takes a second

            if not timm.is_model(self.backbone):
                raise ValueError(f"{p}backbone must be 'conv' or a timm model name, got "
                                 f"{self.backbone!r} (no such timm model)")

    @property
    def tokens(self) -> int:
        return self.grid * self.grid


class ImageFeatures(NamedTuple):
    tokens: torch.Tensor  # [B, grid*grid, dim], raster order (row by row), like VQ codes
    maps: list[torch.Tensor]  # [B, C_i, H_i, W_i], finest first, the token stage's map last
    tags: tuple = ()  # per tag classifier: class probabilities [B, grid*grid, classes]


def _norm(cfg: ImageEncoderConfig, c: int) -> nn.Module:
    if cfg.norm == "groupnorm":  # batch-independent: no running stats, any batch size
        return nn.GroupNorm(math.gcd(cfg.groups, c), c)
    if cfg.norm == "batchnorm":
        return nn.BatchNorm2d(c)
    return nn.Identity()


class ConvNormAct(nn.Sequential):
    def __init__(self, cfg: ImageEncoderConfig, cin: int, cout: int, stride: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, stride, 1, bias=cfg.norm == "none"),
                         _norm(cfg, cout), nn.GELU())


class Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ConvStem(nn.Module):
    """Normalised pixels [B, 3, S, S] -> one map per stride-2 stage (strides 2, 4, ...)."""

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        super().__init__()
        c = cfg.stem_channels
        self.stem = ConvNormAct(cfg, 3, c, 1) if c else nn.Identity()
        cin = c or 3
        self.stages = nn.ModuleList()
        for cout in cfg.channels:
            self.stages.append(nn.Sequential(
                ConvNormAct(cfg, cin, cout, 2),
                *[Residual(ConvNormAct(cfg, cout, cout, 1)) for _ in range(cfg.depth - 1)]))
            cin = cout
        self.channels = list(cfg.channels)
        self.strides = [2 ** (i + 1) for i in range(len(cfg.channels))]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps


class TimmBody(nn.Module):
    """A timm backbone's stages up to the token stage (``features_only``, random init)."""

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        super().__init__()
        import timm

        with torch.device("meta"):  # the stage layout only: no memory, no init cost
            probe = timm.create_model(cfg.backbone, pretrained=False, features_only=True)
        reductions = probe.feature_info.reduction()
        wide = [i for i, r in enumerate(reductions) if cfg.image_size // r >= cfg.grid]
        if not wide:
            raise ValueError(f"{PREFIX}grid {cfg.grid} is finer than any stage of "
                             f"{cfg.backbone} at image_size {cfg.image_size} (reductions "
                             f"{reductions}); lower model.image_encoder.grid")
        # stages past the token stage are not built: no parameters that never get a gradient
        self.model = timm.create_model(cfg.backbone, pretrained=False, features_only=True,
                                       out_indices=tuple(range(wide[-1] + 1)))
        self.channels = self.model.feature_info.channels()
        self.strides = self.model.feature_info.reduction()
        pc = self.model.pretrained_cfg
        self.pixel_mean = tuple(pc.get("mean", (0.485, 0.456, 0.406)))
        self.pixel_std = tuple(pc.get("std", (0.229, 0.224, 0.225)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model(x))


class ImageEncoder(nn.Module):
    """uint8 pixels [B, 3, S, S] -> ``ImageFeatures(tokens [B, grid*grid, dim], maps)``."""

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.backbone == "conv":
            self.body: nn.Module = ConvStem(cfg)
            mean, std = (0.5,) * 3, (0.5,) * 3  # (x/255 - 0.5) / 0.5: [-1, 1]
        else:
            self.body = TimmBody(cfg)
            mean, std = self.body.pixel_mean, self.body.pixel_std
        # pixel statistics in 0-255 units: one fused (x - mean) / std
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)
        self.map_channels: list[int] = list(self.body.channels)
        self.map_strides: list[int] = list(self.body.strides)
        self.proj = nn.Conv2d(self.map_channels[-1], cfg.dim, 1)
        self.tag_heads = nn.ModuleList(nn.Linear(cfg.dim, len(w)) for w in cfg.tags)
        self.frozen = False
        if cfg.frozen:
            self.freeze()

    def freeze(self, frozen: bool = True) -> None:
        """Fix (or free) every parameter and hold the norms in eval mode."""
        self.frozen = frozen
        for p in self.parameters():
            p.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> ImageEncoder:
        super().train(mode)
        if self.frozen:  # the module says "training"; its norms run on kept statistics
            for m in self.modules():
                if m is not self:
                    m.training = False
        return self

    def forward(self, pixels: torch.Tensor, blank: torch.Tensor | None = None) -> ImageFeatures:
        """``blank`` [B, grid, grid] bool: those patches are set to 0 after normalisation
        (the mean colour) before the body, so nothing of them reaches any token (SimMIM's
        masking for convolutional encoders, whose receptive fields cross patches)."""
        s = self.cfg.image_size
        if not isinstance(pixels, torch.Tensor) or pixels.dtype != torch.uint8:
            what = pixels.dtype if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            raise OmnimaskError(f"the image encoder takes uint8 pixels [B, 3, {s}, {s}] "
                                f"(0-255), got {what}; use (x * 255).round().to(torch.uint8)")
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise OmnimaskError(f"the image encoder takes uint8 pixels [B, 3, {s}, {s}] "
                                f"(model.image_encoder.image_size={s}), got shape "
                                f"{tuple(pixels.shape)}")
        x = (pixels.to(self.mean.dtype) - self.mean) / self.std
        if blank is not None:
            g = self.cfg.grid
            if tuple(blank.shape) != (pixels.shape[0], g, g) or blank.dtype != torch.bool:
                raise OmnimaskError(f"blank must be bool [{pixels.shape[0]}, {g}, {g}] (one "
                                    f"flag per patch), got {blank.dtype} {tuple(blank.shape)}")
            k = s // g  # patch side in pixels
            up = blank.to(x.device).repeat_interleave(k, 1).repeat_interleave(k, 2)
            x = x.masked_fill(up[:, None], 0.0)
        maps = self.body(x)
        top = maps[-1]
        if tuple(top.shape[-2:]) != (self.cfg.grid, self.cfg.grid):
            top = F.adaptive_avg_pool2d(top, self.cfg.grid)
        tokens = self.proj(top).flatten(2).transpose(1, 2)  # [B, grid*grid, dim], raster order
        tags = tuple(h(tokens).float().softmax(-1) for h in self.tag_heads)
        return ImageFeatures(tokens, maps, tags)
