"""A contact sheet of samples: image, semantic mask, instance mask and the first caption."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                    [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230]], np.uint8)


def colorize(mask: np.ndarray) -> np.ndarray:
    return PALETTE[np.asarray(mask) % len(PALETTE)]


def contact_sheet(samples: list[dict], path: str | Path, scale: int = 3, cols: int = 4) -> Path:
    """``samples``: dicts with ``image`` (HxWx3), optional ``seg``/``inst`` (HxW), ``caption``."""
    h, w = samples[0]["image"].shape[:2]
    tile_w, text_h = 3 * w * scale + 8, 52
    rows = (len(samples) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * tile_w, rows * (h * scale + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, s in enumerate(samples):
        x0, y0 = (i % cols) * tile_w, (i // cols) * (h * scale + text_h)
        panels = [s["image"]] + [colorize(s[k]) for k in ("seg", "inst") if k in s]
        for j, p in enumerate(panels):
            im = Image.fromarray(np.asarray(p, np.uint8)).resize((w * scale, h * scale),
                                                                Image.NEAREST)
            sheet.paste(im, (x0 + j * w * scale, y0))
        text = "\n".join(textwrap.wrap(s.get("caption", ""), width=tile_w // 6)[:4])
        draw.text((x0 + 2, y0 + h * scale + 2), text, fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
