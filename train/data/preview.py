"""A sample sheet: each sample's image, semantic mask and instance mask side by side, with
its first caption underneath."""

from __future__ import annotations

from pathlib import Path

import numpy as np

PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                    [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230]], np.uint8)


def colorize(mask: np.ndarray) -> np.ndarray:
    return PALETTE[np.asarray(mask) % len(PALETTE)]


def _triptych(s: dict, gap: int = 2) -> np.ndarray:
    panels = [np.asarray(s["image"], np.uint8)] + [colorize(s[k]) for k in ("seg", "inst")
                                                    if k in s]
    sep = np.full((panels[0].shape[0], gap, 3), 255, np.uint8)
    out = [panels[0]]
    for p in panels[1:]:
        out += [sep, p]
    return np.concatenate(out, axis=1)


def contact_sheet(samples: list[dict], path: str | Path, cols: int = 3,
                  title: str = "samples") -> Path:
    """``samples``: dicts with ``image`` (HxWx3), optional ``seg``/``inst`` (HxW), ``caption``."""
    from ..figures import image_table

    panels = "image | semantic mask | instance mask" if "seg" in samples[0] else "image"
    rows, caps = [], []
    for r in range(0, len(samples), cols):
        chunk = samples[r:r + cols]
        rows.append((f"{r + 1}-{r + len(chunk)}", [_triptych(s) for s in chunk]))
        caps.append([s.get("caption", "") for s in chunk])
    # ~1000 px wide: the report's page shows it at its own size, captions ~12 px high
    return image_table(rows, path, f"{title} ({panels}; first caption below)", caps,
                       cell=0.95, wrap=42)
