"""Image and mask processors: decoded uint8 tensors, resized when ``data.image_size`` asks.

Images stay uint8 until they reach the model: a quarter of the bytes through worker IPC.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..base import register_processor


def _resize(t: torch.Tensor, size: int | None, mode: str) -> torch.Tensor:
    """``t``: [C, H, W] or [H, W] uint8; returns the same layout at ``size`` x ``size``."""
    if size is None or tuple(t.shape[-2:]) == (size, size):
        return t
    x = t.reshape(-1, *t.shape[-2:])[None].float()
    if mode == "nearest":
        y = F.interpolate(x, size=(size, size), mode="nearest-exact")
    else:
        y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False).round_().clamp_(0, 255)
    return y[0].to(torch.uint8).reshape(*t.shape[:-2], size, size)


@register_processor("image", keys=("image.png",))
def make_image(cfg):
    size = cfg.image_size
    return lambda d: {"image": _resize(d["image.png"], size, "bilinear")}


@register_processor("masks", keys=("seg.png", "inst.png"))
def make_masks(cfg):
    size = cfg.image_size
    return lambda d: {"seg": _resize(d["seg.png"], size, "nearest"),
                      "inst": _resize(d["inst.png"], size, "nearest")}
