"""Labelled image tables as matplotlib figures: what the report and TensorBoard show.

``image_table`` draws rows of images with a label per row, a caption per image and a title,
at a size where the text reads (captions ~12 px); the sample sheets, the VQ reconstructions
and the generated images all go through it.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

MAX_LINES = 6  # caption lines under an image; longer ones end in ...


def _hwc(x) -> np.ndarray:
    """An HxWx3 uint8 array from a [3, H, W] tensor or an HxW(x3) array."""
    a = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    return a.astype(np.uint8)


def image_table(rows: list[tuple[str, list]], path: str | Path, title: str,
                captions: list[list[str]] | None = None, cell: float = 1.25,
                wrap: int = 22, dpi: int = 100) -> Path:
    """``rows``: (label, images) with the same number of images each; ``captions``: one
    list per row (text under each image, wrapped at ``wrap`` characters), or None."""
    from .tasks.base import pyplot, save_figure

    plt = pyplot()
    ncols = max(len(ims) for _, ims in rows)
    lines = [max((len(textwrap.wrap(c, wrap)) for c in caps), default=0) if caps else 0
             for caps in (captions or [[]] * len(rows))]
    heights = [cell + 0.18 * min(n, MAX_LINES) + 0.05 for n in lines]
    fig, axes = plt.subplots(len(rows), ncols, squeeze=False,
                             figsize=(0.5 + ncols * cell * _aspect(rows), sum(heights) + 0.5),
                             gridspec_kw={"height_ratios": heights})
    for r, (label, ims) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(ims):
                ax.axis("off")
                continue
            ax.imshow(_hwc(ims[c]), interpolation="nearest")
            if c == 0:
                ax.set_ylabel(label, fontsize=9)
            if captions and captions[r] and c < len(captions[r]):
                ax.set_xlabel(_wrapped(captions[r][c], wrap), fontsize=8.5)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(pad=0.4)
    return save_figure(fig, Path(path), dpi=dpi)


def _wrapped(text: str, width: int) -> str:
    lines = textwrap.wrap(text, width)
    if len(lines) > MAX_LINES:
        lines = lines[:MAX_LINES - 1] + [lines[MAX_LINES - 1][:width - 3] + "..."]
    return "\n".join(lines)


def _aspect(rows: list[tuple[str, list]]) -> float:
    """Width over height of the first image (a sample sheet's triptych is ~3)."""
    a = _hwc(rows[0][1][0])
    return a.shape[1] / a.shape[0]
