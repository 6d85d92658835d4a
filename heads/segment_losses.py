"""Mask losses, point sampling and Hungarian matching of the segmentation head (Mask2Former's
``criterion.py``, ``matcher.py`` and ``point_features.py``, as SEEM uses them).

Masks are scored on sampled points, not on every pixel, so the cost does not grow with the
image: the matcher compares every query with every target on one shared set of uniform
points per image; the loss scores each matched pair on points drawn mostly where the
prediction is uncertain (``|logit|`` small: importance sampling), the rest uniformly.
Coordinates are (x, y) in [0, 1]; every random draw takes a ``torch.Generator``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def point_sample(maps: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear values of ``maps`` [N, C, H, W] at ``coords`` [N, P, 2] (x, y in [0, 1],
    pixel centres as ``align_corners=False``) -> [N, C, P]."""
    grid = (2.0 * coords - 1.0).unsqueeze(2).to(maps.dtype)
    return F.grid_sample(maps, grid, align_corners=False).squeeze(3)


def uncertain_points(logits: torch.Tensor, points: int, oversample: float, importance: float,
                     gen: torch.Generator | None = None) -> torch.Tensor:
    """[N, points, 2] coordinates: ``importance`` of them the most uncertain of
    ``points * oversample`` uniform candidates of each map in ``logits`` [N, 1, H, W], the
    rest uniform."""
    n, dev = logits.shape[0], logits.device
    cand = torch.rand(n, int(points * oversample), 2, generator=gen).to(dev)
    unc = -point_sample(logits.float(), cand)[:, 0].abs()
    k = int(importance * points)
    top = unc.topk(k, dim=1).indices
    chosen = cand.gather(1, top[..., None].expand(-1, -1, 2))
    rest = torch.rand(n, points - k, 2, generator=gen).to(dev)
    return torch.cat([chosen, rest], 1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Sum over masks of ``1 - (2 sum(p t) + 1) / (sum p + sum t + 1)``, ``p = sigmoid(
    logits)`` ([N, P] each), divided by ``num_masks``."""
    p = logits.sigmoid()
    num = 2 * (p * targets).sum(-1)
    return (1 - (num + 1) / (p.sum(-1) + targets.sum(-1) + 1)).sum() / num_masks


def bce_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Binary cross-entropy averaged over each mask's points, summed over masks, divided by
    ``num_masks``."""
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def pairwise_dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[Q, T] dice loss of every prediction (``logits`` [Q, P]) with every target [T, P]."""
    p = logits.sigmoid()
    num = 2 * p @ targets.T
    den = p.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (num + 1) / (den + 1)


def pairwise_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[Q, T] mean binary cross-entropy of every prediction with every target."""
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return (pos @ targets.T + neg @ (1 - targets).T) / logits.shape[1]


def hungarian(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The assignment of least total ``cost`` [Q, T] (rows: queries, Q >= T): (query
    indices, target indices), sorted by query."""
    from scipy.optimize import linear_sum_assignment

    c = cost.detach().float().cpu()
    if not torch.isfinite(c).all():
        raise ValueError("the matching cost has NaN or infinite entries")
    r, t = linear_sum_assignment(c.numpy())
    return torch.as_tensor(r, dtype=torch.long), torch.as_tensor(t, dtype=torch.long)


@torch.no_grad()
def match(class_logits: torch.Tensor, mask_logits: torch.Tensor, labels: torch.Tensor,
          masks: torch.Tensor, points: int, weights: tuple[float, float, float],
          gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's matching: queries (``class_logits`` [Q, K+1], the last the no-object
    class; ``mask_logits`` [Q, H, W]) against targets (``labels`` [T], ``masks`` [T, h, w]
    float) by ``weights`` = (class, BCE, dice) costs on ``points`` shared uniform points."""
    if len(labels) == 0:
        e = torch.zeros(0, dtype=torch.long)
        return e, e
    coords = torch.rand(1, points, 2, generator=gen).to(mask_logits.device)
    masks = masks.to(mask_logits.device)  # targets come from the CPU batch
    out = point_sample(mask_logits[:, None].float(), coords.expand(len(mask_logits), -1, -1))
    tgt = point_sample(masks[:, None].float(), coords.expand(len(masks), -1, -1))
    out, tgt = out[:, 0], tgt[:, 0]
    prob = class_logits.float().softmax(-1)
    wc, wb, wd = weights
    cost = -wc * prob[:, labels] + wb * pairwise_bce(out, tgt) + wd * pairwise_dice(out, tgt)
    return hungarian(cost)


def mask_losses(pred: torch.Tensor, target: torch.Tensor, num_masks: float, points: int,
                oversample: float = 3.0, importance: float = 0.75,
                gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(BCE, dice) of matched ``pred`` logits [M, H, W] against ``target`` masks [M, h, w] on
    importance-sampled points (the sampling sees no gradient)."""
    if len(pred) == 0:
        z = pred.sum() * 0.0
        return z, z
    with torch.no_grad():
        coords = uncertain_points(pred[:, None].detach(), points, oversample, importance, gen)
        labels = point_sample(target[:, None].to(pred.dtype), coords)[:, 0]
    logits = point_sample(pred[:, None], coords)[:, 0]
    return bce_loss(logits, labels, num_masks), dice_loss(logits, labels, num_masks)
