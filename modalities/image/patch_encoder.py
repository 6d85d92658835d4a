"""Continuous image features from any timm backbone (ViT, ConvNeXt, ...), as patch tokens.

Used where objectives need region/patch features (UNITER masked region modelling, SEEM).
Random initialisation by default; ``pretrained=True`` loads timm's weights only from the
local Hugging Face cache (nothing is downloaded) and falls back to random initialisation
with a warning when they are not there.
"""

from __future__ import annotations

import logging

import timm
import torch
from torch import nn

from omnimask.errors import OmnimaskError

log = logging.getLogger("omnimask.image")
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _cached_weights(name: str) -> str | None:
    """Path of the backbone's pretrained file in the local HF cache, if it is there."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cfg = timm.models.get_pretrained_cfg(name)
        hub = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        if not hub:
            return None
        for fname in ("model.safetensors", "pytorch_model.bin"):
            p = try_to_load_from_cache(hub, fname)
            if isinstance(p, str):
                return p
    except Exception:  # noqa: BLE001 - any cache problem just means "not cached"
        return None
    return None


class PatchEncoder(nn.Module):
    """uint8 images [B, 3, H, W] -> patch tokens [B, N, dim] (prefix/class tokens dropped)."""

    def __init__(self, name: str = "vit_tiny_patch16_224", image_size: int = 64,
                 patch_size: int | None = 8, pretrained: bool = False, **kwargs) -> None:
        super().__init__()
        if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
            raise OmnimaskError(f"unknown timm model {name!r}")
        extra = dict(kwargs)
        if "vit" in name or "deit" in name:
            extra.setdefault("img_size", image_size)
            if patch_size:
                extra.setdefault("patch_size", patch_size)
        overlay = None
        if pretrained:
            path = _cached_weights(name)
            if path is None:
                log.warning("no cached pretrained weights for %s; using random initialisation",
                            name)
                pretrained = False
            else:
                overlay = {"file": path}
        self.model = timm.create_model(name, pretrained=pretrained, num_classes=0,
                                       pretrained_cfg_overlay=overlay, **extra)
        self.pretrained = pretrained
        self.dim = self.model.num_features
        self.prefix = getattr(self.model, "num_prefix_tokens", 0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() / 255.0 - MEAN.to(images.device)) / STD.to(images.device)
        f = self.model.forward_features(x)
        if f.ndim == 4:  # conv nets: [B, C, h, w] -> [B, h*w, C]
            return f.flatten(2).transpose(1, 2)
        return f[:, self.prefix:]
