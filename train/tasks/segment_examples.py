"""Qualitative PNGs of the segmentation tasks: semantic overlays beside the truth, clicked
objects with the mask they gave, referred objects outlined under their expression."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .base import pyplot, save_figure


def _image(corpus, i: int) -> np.ndarray:
    return corpus.pixels[i].permute(1, 2, 0).numpy()


def _palette(n: int) -> np.ndarray:
    """[n, 3] colours in [0, 1]; class 0 (background) black."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    out = np.array([cmap(k % 10)[:3] for k in range(n)])
    out[0] = 0.0
    return out


def _overlay(img: np.ndarray, labels: torch.Tensor, pal: np.ndarray, alpha: float = 0.55):
    lab = labels.long().clamp(0, len(pal) - 1).numpy()
    colour = pal[lab]
    base = img.astype(np.float64) / 255
    keep = (lab == 0)[..., None]
    return np.where(keep, base * 0.6, (1 - alpha) * base + alpha * colour)


def semantic_examples(corpus, shown: list[tuple[int, torch.Tensor, torch.Tensor]],
                      names: list[str], path: Path, clicks: list[tuple] | None = None) -> Path:
    """Rows of (image, truth, model) for each image in ``shown`` (image, true and predicted
    class maps, both in ``names``' ids), two per row, a legend of the class colours; then
    ``clicks``: (image, clicks [(row, col, positive)], mask) drawn as the mask with its
    clicks."""
    plt = pyplot()
    pal = _palette(len(names))
    per_row = 2
    rows = (len(shown) + per_row - 1) // per_row + (1 if clicks else 0)
    fig, axes = plt.subplots(max(rows, 1), 3 * per_row, figsize=(2.1 * 3 * per_row,
                                                                 2.3 * max(rows, 1)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, (i, truth, pred) in enumerate(shown):
        r, c = divmod(k, per_row)
        img = _image(corpus, i)
        truth = truth.where(truth < len(names), 0)  # classes the head lacks: background
        for j, (pic, title) in enumerate([(img / 255, "image"),
                                          (_overlay(img, truth, pal), "truth"),
                                          (_overlay(img, pred, pal), "model")]):
            ax = axes[r, 3 * c + j]
            ax.imshow(pic, interpolation="nearest")
            ax.set_title(title, fontsize=9)
    if clicks:
        for k, (i, cl, mask) in enumerate(clicks[:3 * per_row]):
            ax = axes[-1, k]
            img = _image(corpus, i)
            ax.imshow(_overlay(img, mask.long() * 1, np.array([[0, 0, 0], [0.1, 0.9, 0.2]])),
                      interpolation="nearest")
            for row, col, pos in cl:
                ax.plot(col, row, "+" if pos else "x", color="white" if pos else "red",
                        markersize=10, markeredgewidth=2)
            ax.set_title("click -> mask", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=pal[k]) for k in range(1, len(names))]
    fig.legend(handles, names[1:], loc="lower center", ncol=min(8, len(names)), fontsize=8)
    fig.suptitle("Segmentation: classes (truth, model) and clicked objects", fontsize=12)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    return save_figure(fig, path, dpi=90)


def referring_examples(corpus, shown: list[tuple], path: Path) -> Path:
    """Each (image, expression, predicted mask, true mask): the image with the true object
    outlined in green and the model's mask in dashed yellow, the expression as the title."""
    plt = pyplot()
    cols = 4
    rows = (len(shown) + cols - 1) // cols
    fig, axes = plt.subplots(max(rows, 1), cols, figsize=(3.0 * cols, 3.2 * max(rows, 1)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (i, expr, pred, truth) in zip(axes.flat, shown):
        ax.imshow(_image(corpus, i), interpolation="nearest")
        ax.contour(truth.numpy().astype(float), levels=[0.5], colors="lime", linewidths=2)
        if pred.any():
            ax.contour(pred.numpy().astype(float), levels=[0.5], colors="yellow",
                       linewidths=2, linestyles="dashed")
        inter = int((pred & truth).sum())
        union = int((pred | truth).sum())
        ax.set_title(f"{expr}\nIoU {inter / max(union, 1):.2f}", fontsize=9)
    fig.suptitle("Referring segmentation: the model's mask (dashed yellow), the object (green)",
                 fontsize=12)
    fig.tight_layout()
    return save_figure(fig, path, dpi=90)
