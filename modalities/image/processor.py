"""Image and mask processors: decoded uint8 tensors, fitted to ``data.image_size`` when it
asks, by ``data.image_fit``:

- ``crop`` (default): scale so the shorter side is ``size``, keep the centre square;
- ``pad``: scale so the longer side is ``size``, centre it on a black square;
- ``stretch``: scale each side to ``size`` (shapes change when the image is not square).

Images stay uint8 until they reach the model: a quarter of the bytes through worker IPC.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from omnimask.config import IMAGE_FITS

from ..base import register_processor

FITS = IMAGE_FITS


@dataclass(frozen=True)
class Fit:
    """Where an ``h`` x ``w`` image lands in the ``size`` x ``size`` square: it is scaled to
    ``rh`` x ``rw``, then placed at (``top``, ``left``) (negative: cropped there)."""

    h: int
    w: int
    size: int
    fit: str

    @property
    def scaled(self) -> tuple[int, int]:
        if self.fit == "stretch":
            return self.size, self.size
        side = min(self.h, self.w) if self.fit == "crop" else max(self.h, self.w)
        s = self.size / side
        return max(1, round(self.h * s)), max(1, round(self.w * s))

    @property
    def offset(self) -> tuple[int, int]:
        rh, rw = self.scaled
        return (self.size - rh) // 2, (self.size - rw) // 2

    def point(self, x: float, y: float) -> tuple[float, float]:
        """Image pixel coordinates -> coordinates in the square, as fractions of its side."""
        (rh, rw), (top, left) = self.scaled, self.offset
        return (left + x * rw / self.w) / self.size, (top + y * rh / self.h) / self.size

    def unfit(self, t: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """[..., size, size] float maps of the square -> [..., h, w] over the image; ``pad``
        and ``stretch`` only (a crop lost the borders)."""
        if self.fit == "crop" and (self.h != self.w):
            raise ValueError("a centre crop cannot be undone; fit with 'pad' or 'stretch'")
        (rh, rw), (top, left) = self.scaled, self.offset
        x = t[..., max(top, 0):max(top, 0) + rh, max(left, 0):max(left, 0) + rw]
        lead = x.shape[:-2]
        x = x.reshape(1, -1, *x.shape[-2:])
        kw = {"align_corners": False} if mode == "bilinear" else {}
        return F.interpolate(x, size=(self.h, self.w), mode=mode, **kw).reshape(
            *lead, self.h, self.w)


def fit_image(t: torch.Tensor, size: int | None, fit: str = "crop",
              mode: str = "bilinear") -> torch.Tensor:
    """``t``: [C, H, W] or [H, W] uint8 -> the same layout at ``size`` x ``size`` by ``fit``
    (``mode``: bilinear with antialiasing for images, nearest for label maps)."""
    if fit not in FITS:
        raise ValueError(f"image fit must be one of {', '.join(FITS)}, got {fit!r}")
    h, w = t.shape[-2:]
    if size is None or (h, w) == (size, size):
        return t
    geo = Fit(int(h), int(w), size, fit)
    rh, rw = geo.scaled
    x = t.reshape(-1, h, w)[None].float()
    if (rh, rw) != (h, w):
        if mode == "nearest":
            x = F.interpolate(x, size=(rh, rw), mode="nearest-exact")
        else:
            x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True,
                              align_corners=False).round_().clamp_(0, 255)
    top, left = geo.offset
    if fit == "crop":
        x = x[..., -top:-top + size, -left:-left + size]
    elif fit == "pad":
        x = F.pad(x, (left, size - rw - left, top, size - rh - top))
    return x[0].to(torch.uint8).reshape(*t.shape[:-2], size, size)


# colour words a hue turn changes (greys, black and white it keeps)
HUE_WORDS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink", "brown",
             "magenta", "violet", "teal", "turquoise", "maroon", "navy", "olive", "lime",
             "gold", "golden", "beige", "tan", "indigo", "colored", "coloured", "colorful",
             "colourful")


def words_pattern(words) -> re.Pattern:
    """Matches any of ``words`` as a whole word, case-insensitively (none: nothing)."""
    alts = "|".join(re.escape(w) for w in words)
    return re.compile(rf"\b(?:{alts})\b" if alts else "(?!)", re.IGNORECASE)


def hue_rotate(t: torch.Tensor, angle: float) -> torch.Tensor:
    """[3, H, W] uint8 rotated by ``angle`` radians about the grey axis of RGB space (a
    linear hue shift: greys stay, a turn of 2 pi / 3 cycles R -> G -> B), clipped to uint8."""
    c, s = math.cos(angle), math.sin(angle)
    u = torch.full((3,), 1 / math.sqrt(3), dtype=torch.float64)
    cross = torch.tensor([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]],
                         dtype=torch.float64)
    rot = c * torch.eye(3, dtype=torch.float64) + s * cross + (1 - c) * torch.outer(u, u)
    x = torch.einsum("ij,jhw->ihw", rot.float(), t.float())
    return x.round_().clamp_(0, 255).to(torch.uint8)


@register_processor("image", keys=("image.png",))
def make_image(cfg):
    size, fit = cfg.image_size, cfg.image_fit
    return lambda d: {"image": fit_image(d["image.png"], size, fit)}


@register_processor("masks", keys=("seg.png", "inst.png"))
def make_masks(cfg):
    size, fit = cfg.image_size, cfg.image_fit
    return lambda d: {"seg": fit_image(d["seg.png"], size, fit, "nearest"),
                      "inst": fit_image(d["inst.png"], size, fit, "nearest")}
