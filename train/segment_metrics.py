"""Segmentation metrics: pure functions over label maps and masks, no model code.

- Semantic: ``SemanticMeter`` accumulates a confusion matrix (ground truth ``ignore`` = 255
  skipped) and reports ``miou``, ``per_class_iou``, ``pixel_accuracy`` as detectron2's
  ``SemSegEvaluator`` does: a class that neither the truth nor the prediction contains has
  no IoU and stays out of the mean.
- Panoptic: ``PanopticMeter``, panopticapi's PQ: segments of one class match when their IoU
  is over 0.5 (the union leaves out the prediction's void pixels); a prediction mostly on
  void is not a false positive; PQ = sum of matched IoUs / (TP + FP/2 + FN/2), averaged
  over the classes that occur.
- Referring: ``mask_iou`` per expression; ``miou`` their mean, ``ciou`` the summed
  intersections over the summed unions (cumulative IoU, as in LAVT and SEEM's reports).
- Interactive: ``next_click`` (the standard protocol of RITM / SimpleClick: a click at the
  point farthest from the boundary of the larger error region, positive in a missed part,
  negative in a false one) and ``clicks_to_iou`` (NoC@IoU for one object;
  ``clicks_to_iou_many`` for several, each round's masks asked for at once).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

IGNORE = 255


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class SemanticMeter:
    """Confusion matrix of ``classes`` classes over every pixel added (rows: truth)."""

    def __init__(self, classes: int, names: Sequence[str] | None = None,
                 ignore: int = IGNORE) -> None:
        self.k = classes
        self.names = list(names) if names is not None else [str(c) for c in range(classes)]
        if len(self.names) != classes:
            raise ValueError(f"{len(self.names)} class names for {classes} classes")
        self.ignore = ignore
        self.conf = np.zeros((classes, classes), dtype=np.int64)

    def add(self, pred, truth) -> None:
        """``pred`` and ``truth``: [H, W] (or any equal shapes) class ids."""
        p, t = _np(pred).astype(np.int64).ravel(), _np(truth).astype(np.int64).ravel()
        if p.shape != t.shape:
            raise ValueError(f"prediction of {p.size} pixels against truth of {t.size}")
        keep = t != self.ignore
        p, t = p[keep], t[keep]
        if t.size and (t.max() >= self.k or t.min() < 0):
            raise ValueError(f"truth has class {int(t.max())}, outside 0..{self.k - 1}")
        if p.size and (p.max() >= self.k or p.min() < 0):
            raise ValueError(f"prediction has class {int(p.max())}, outside 0..{self.k - 1}")
        self.conf += np.bincount(t * self.k + p, minlength=self.k ** 2).reshape(self.k, self.k)

    def report(self) -> dict:
        tp = np.diag(self.conf).astype(np.float64)
        gt, pred = self.conf.sum(1), self.conf.sum(0)
        union = gt + pred - tp
        iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
        valid = union > 0
        return {"miou": float(iou[valid].mean()) if valid.any() else 0.0,
                "per_class_iou": {n: (None if np.isnan(v) else round(float(v), 4))
                                  for n, v in zip(self.names, iou)},
                "pixel_accuracy": float(tp.sum() / max(gt.sum(), 1))}


class PanopticMeter:
    """PQ over images added as (segment-id map, {segment id: class}) for prediction and
    truth; truth pixels of id 0 that the truth's classes do not name, or of class ``ignore``,
    are void."""

    def __init__(self, classes: int, ignore: int = IGNORE) -> None:
        self.k = classes
        self.ignore = ignore
        self.iou = np.zeros(classes)
        self.tp = np.zeros(classes, dtype=np.int64)
        self.fp = np.zeros(classes, dtype=np.int64)
        self.fn = np.zeros(classes, dtype=np.int64)

    def add(self, pred_ids, pred_classes: dict[int, int], gt_ids,
            gt_classes: dict[int, int]) -> None:
        p, g = _np(pred_ids).astype(np.int64).ravel(), _np(gt_ids).astype(np.int64).ravel()
        if p.shape != g.shape:
            raise ValueError(f"prediction of {p.size} pixels against truth of {g.size}")
        void = ~np.isin(g, [s for s, c in gt_classes.items() if c != self.ignore])
        p_area = {s: int((p == s).sum()) for s in pred_classes}
        g_area = {s: int((g == s).sum()) for s, c in gt_classes.items() if c != self.ignore}
        g_area = {s: a for s, a in g_area.items() if a > 0}
        p_area = {s: a for s, a in p_area.items() if a > 0}
        pairs = {}
        for s in p_area:  # intersections of each predicted segment
            on = p == s
            ids, cnt = np.unique(np.where(void[on], -1, g[on]), return_counts=True)
            pairs[s] = dict(zip(ids.tolist(), cnt.tolist()))
        g_hit, p_hit = set(), set()
        for s, inter in pairs.items():
            for t, n in inter.items():
                if t < 0 or t not in g_area or gt_classes[t] != pred_classes[s]:
                    continue
                union = p_area[s] + g_area[t] - n - inter.get(-1, 0)
                iou = n / union
                if iou > 0.5:  # at most one match each (IoU > 0.5 is unique)
                    c = gt_classes[t]
                    self.tp[c] += 1
                    self.iou[c] += iou
                    g_hit.add(t)
                    p_hit.add(s)
        for t in g_area:
            if t not in g_hit:
                self.fn[gt_classes[t]] += 1
        for s in p_area:
            if s in p_hit:
                continue
            if pairs[s].get(-1, 0) / p_area[s] > 0.5:  # mostly on void: not counted
                continue
            self.fp[pred_classes[s]] += 1

    def report(self) -> dict:
        denom = self.tp + 0.5 * self.fp + 0.5 * self.fn
        valid = denom > 0
        if not valid.any():
            return {"pq": 0.0, "sq": 0.0, "rq": 0.0}
        pq = self.iou[valid] / denom[valid]
        sq = np.where(self.tp > 0, self.iou / np.maximum(self.tp, 1), 0.0)[valid]
        rq = self.tp[valid] / denom[valid]
        return {"pq": float(pq.mean()), "sq": float(sq.mean()), "rq": float(rq.mean())}


def mask_iou(pred, truth) -> tuple[int, int]:
    """(intersection, union) pixel counts of two boolean masks."""
    p, t = _np(pred).astype(bool), _np(truth).astype(bool)
    if p.shape != t.shape:
        raise ValueError(f"mask of shape {p.shape} against truth of {t.shape}")
    return int((p & t).sum()), int((p | t).sum())


def referring_report(pairs: Sequence[tuple[int, int]]) -> dict:
    """``miou`` (an empty union counts 1: nothing asked, nothing given) and ``ciou`` of
    (intersection, union) counts."""
    if not pairs:
        return {"miou": 0.0, "ciou": 0.0, "n": 0}
    ious = [i / u if u else 1.0 for i, u in pairs]
    inter, union = sum(i for i, _ in pairs), sum(u for _, u in pairs)
    return {"miou": float(np.mean(ious)), "ciou": inter / union if union else 1.0,
            "n": len(pairs)}


Click = tuple[int, int, bool]  # (row, column, positive)


def next_click(pred, truth) -> Click:
    """The next simulated click: in the missed (positive) or false (negative) region whose
    interior point lies farthest from its boundary, at that point (the image border counts
    as boundary, as RITM pads before the distance transform)."""
    from scipy.ndimage import distance_transform_edt

    p, t = _np(pred).astype(bool), _np(truth).astype(bool)
    dist = []
    for err in (t & ~p, p & ~t):
        d = distance_transform_edt(np.pad(err, 1))[1:-1, 1:-1]
        dist.append(d)
    positive = dist[0].max() >= dist[1].max()
    d = dist[0] if positive else dist[1]
    r, c = np.unravel_index(int(np.argmax(d)), d.shape)
    return int(r), int(c), bool(positive)


def clicks_to_iou(predict: Callable[[list[Click]], np.ndarray], truth, target: float = 0.85,
                  max_clicks: int = 20) -> tuple[int, list[float]]:
    """Clicks until ``predict(clicks)``'s mask reaches IoU ``target`` with ``truth`` (NoC;
    ``max_clicks`` when it never does) and the IoU after each click."""
    return clicks_to_iou_many(lambda asks: [predict(c) for _, c in asks], [truth], target,
                              max_clicks)[0]


def clicks_to_iou_many(predict: Callable[[list[tuple[int, list[Click]]]], Sequence],
                       truths: Sequence, target: float = 0.85,
                       max_clicks: int = 20) -> list[tuple[int, list[float]]]:
    """``clicks_to_iou`` for several objects at once: each round, every object not yet at
    ``target`` gets its next click, and ``predict`` is asked for all their masks in one call
    (a list of (object index, its clicks so far) -> a mask per entry), so a model can
    batch them."""
    truths = [_np(t).astype(bool) for t in truths]
    clicks: list[list[Click]] = [[] for _ in truths]
    ious: list[list[float]] = [[] for _ in truths]
    preds = [np.zeros(t.shape, dtype=bool) for t in truths]
    noc = [max_clicks] * len(truths)
    active = list(range(len(truths)))
    for k in range(1, max_clicks + 1):
        if not active:
            break
        for j in active:
            clicks[j].append(next_click(preds[j], truths[j]))
        masks = predict([(j, list(clicks[j])) for j in active])
        still = []
        for j, m in zip(active, masks, strict=True):
            preds[j] = _np(m).astype(bool)
            i, u = mask_iou(preds[j], truths[j])
            ious[j].append(i / u if u else 1.0)
            if ious[j][-1] >= target:
                noc[j] = k
            else:
                still.append(j)
        active = still
    return list(zip(noc, ious))
