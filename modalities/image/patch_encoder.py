"""Continuous image features from any timm backbone (ViT, ConvNeXt, ...), as patch tokens.

Used where objectives need region/patch features (UNITER masked region modelling, SEEM).
Random initialisation by default. ``pretrained=True`` loads timm's weights from the local
Hugging Face cache only (nothing is downloaded; safetensors files only, never a pickle) and
fails, saying how to get them, when they are not there; ``pretrained="if_cached"`` falls
back to random initialisation with a warning instead. Inputs are normalised with the
backbone's own ``pretrained_cfg`` mean and std (ImageNet's when it names none).
"""

from __future__ import annotations

import logging

import timm
import torch
from torch import nn

from omnimask.errors import OmnimaskError

log = logging.getLogger("omnimask.image")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _cached_weights(name: str) -> str | None:
    """Path of the backbone's pretrained file in the local HF cache, if it is there."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cfg = timm.models.get_pretrained_cfg(name)
        hub = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        if not hub:
            return None
        p = try_to_load_from_cache(hub, "model.safetensors")  # never a pickle (.bin)
        if isinstance(p, str):
            return p
    except Exception:  # noqa: BLE001 - any cache problem just means "not cached"
        return None
    return None


class PatchEncoder(nn.Module):
    """uint8 images [B, 3, H, W] -> patch tokens [B, N, dim] (prefix/class tokens dropped)."""

    def __init__(self, name: str = "vit_tiny_patch16_224", image_size: int = 64,
                 patch_size: int | None = 8, pretrained: bool | str = False,
                 **kwargs) -> None:
        super().__init__()
        if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
            raise OmnimaskError(f"unknown timm model {name!r}")
        extra = dict(kwargs)
        if "vit" in name or "deit" in name:
            extra.setdefault("img_size", image_size)
            if patch_size:
                extra.setdefault("patch_size", patch_size)
        if pretrained not in (True, False, "if_cached"):
            raise OmnimaskError(f"pretrained must be true, false or 'if_cached', got "
                                f"{pretrained!r}")
        overlay = None
        if pretrained:
            path = _cached_weights(name)
            if path is None and pretrained == "if_cached":
                log.warning("no cached pretrained weights for %s; using random initialisation",
                            name)
                pretrained = False
            elif path is None:
                cfg = timm.models.get_pretrained_cfg(name.split(".")[0])
                hub = getattr(cfg, "hf_hub_id", None) or name
                raise OmnimaskError(
                    f"no cached pretrained weights for timm model {name!r}: omnimask downloads "
                    f"nothing; on a machine with a network run `hf download {hub} "
                    f"model.safetensors` (the Hugging Face cache, HF_HUB_CACHE), or use "
                    "pretrained='if_cached' to train from random weights")
            else:
                overlay = {"file": path}
                pretrained = True
        self.model = timm.create_model(name, pretrained=pretrained, num_classes=0,
                                       pretrained_cfg_overlay=overlay, **extra)
        self.pretrained = pretrained
        self.dim = self.model.num_features
        self.prefix = getattr(self.model, "num_prefix_tokens", 0)
        pc = getattr(self.model, "pretrained_cfg", None) or {}
        self.register_buffer("mean", torch.tensor(pc.get("mean") or IMAGENET_MEAN,
                                                  dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(pc.get("std") or IMAGENET_STD,
                                                 dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() / 255.0 - self.mean) / self.std
        f = self.model.forward_features(x)
        if f.ndim == 4:  # conv nets: [B, C, h, w] -> [B, h*w, C]
            return f.flatten(2).transpose(1, 2)
        return f[:, self.prefix:]
