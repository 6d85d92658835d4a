"""Segmentation metrics against hand-computed cases: mIoU, PQ, referring IoU, NoC."""

import numpy as np
import pytest

from omnimask.train.segment_metrics import (
    IGNORE,
    PanopticMeter,
    SemanticMeter,
    clicks_to_iou,
    clicks_to_iou_many,
    mask_iou,
    next_click,
    referring_report,
)


def test_semantic_perfect_disjoint_and_half():
    t = np.zeros((4, 4), int)
    t[:, 2:] = 1
    m = SemanticMeter(3, ["bg", "a", "b"])
    m.add(t, t)
    r = m.report()
    assert r["miou"] == 1.0 and r["per_class_iou"]["b"] is None  # absent: not in the mean
    m = SemanticMeter(2)
    m.add(1 - t, t)  # every pixel wrong
    assert m.report()["miou"] == 0.0 and m.report()["pixel_accuracy"] == 0.0
    m = SemanticMeter(2)
    p = t.copy()
    p[:2, :] = 1  # class 1 predicted on the top half: 12 pixels, 8 of them right
    m.add(p, t)
    r = m.report()
    # class 0: tp 4, truth 8, predicted 4 -> 4/8; class 1: tp 8, truth 8, predicted 12 -> 8/12
    assert r["per_class_iou"]["0"] == 0.5
    assert r["per_class_iou"]["1"] == pytest.approx(0.6667, abs=1e-4)
    assert r["miou"] == pytest.approx((0.5 + 8 / 12) / 2)


def test_semantic_ignores_void_and_checks_ids():
    t = np.array([[0, IGNORE], [1, 1]])
    m = SemanticMeter(2)
    m.add(np.array([[0, 1], [1, 1]]), t)  # the wrong pixel is void
    assert m.report()["miou"] == 1.0
    with pytest.raises(ValueError, match="outside"):
        m.add(np.array([[5, 0], [1, 1]]), t)


def _square(n=10, at=(0, 0), side=4):
    a = np.zeros((n, n), int)
    a[at[0]:at[0] + side, at[1]:at[1] + side] = 1
    return a


def test_panoptic_perfect_disjoint_and_partial():
    g = _square()  # segment 1 of class 2, the rest segment 0 of class 0 (stuff)
    classes = {0: 0, 1: 2}
    m = PanopticMeter(3)
    m.add(g, classes, g, classes)
    assert m.report() == {"pq": 1.0, "sq": 1.0, "rq": 1.0}
    m = PanopticMeter(3)
    m.add(_square(at=(6, 6)), classes, g, classes)  # the object far from the truth
    r = m.report()
    # background: IoU (100-16-16+0)/(100-... ) -> 68/(84+84-68)=0.68 > 0.5 matched;
    # class 2: one FP, one FN -> 0
    assert r["pq"] == pytest.approx((0.68 + 0.0) / 2)
    m = PanopticMeter(3)
    half = _square(at=(0, 2))  # 8 of 16 pixels overlap: IoU 8/24 < 0.5 -> FP + FN
    m.add(half, classes, g, classes)
    assert m.report()["rq"] < 1.0
    m = PanopticMeter(3)
    close = _square(at=(1, 0))  # 12 of 16 overlap: IoU 12/20 = 0.6 -> TP
    m.add(close, classes, g, classes)
    bg_iou = (100 - 20) / (100 - 12)
    assert m.report()["pq"] == pytest.approx((0.6 + bg_iou) / 2)


def test_panoptic_void_not_counted():
    g = np.zeros((10, 10), int)
    g[:5] = 1  # segment 1: class 1; segment 0 is void (unnamed)
    p = np.zeros((10, 10), int)
    p[:5] = 1
    p[5:] = 2  # a prediction on the void: not a false positive
    m = PanopticMeter(2)
    m.add(p, {1: 1, 2: 0}, g, {1: 1})
    assert m.report() == {"pq": 1.0, "sq": 1.0, "rq": 1.0}


def test_referring_miou_and_ciou():
    a, b = _square(), _square(at=(0, 2))
    assert mask_iou(a, b) == (8, 24)
    r = referring_report([mask_iou(a, a), mask_iou(a, b)])
    assert r["miou"] == pytest.approx((1 + 8 / 24) / 2)
    assert r["ciou"] == pytest.approx((16 + 8) / (16 + 24))


def test_next_click_protocol():
    g = _square(n=11, at=(2, 2), side=5)
    r, c, pos = next_click(np.zeros_like(g), g)
    assert pos and (r, c) == (4, 4)  # the centre of the missed square
    p = g.copy()
    p[8:, 8:] = 1  # a false blob, larger than anything missed
    r, c, pos = next_click(p, g)
    assert not pos and r >= 8 and c >= 8


def test_clicks_to_iou_on_a_known_predictor():
    g = np.zeros((20, 20), int)
    g[:10, :10] = 1

    def grows(clicks):  # two more rows of the object per click
        p = np.zeros_like(g)
        p[:2 * len(clicks), :10] = 1
        return p & g

    noc, ious = clicks_to_iou(grows, g, 0.85, 20)
    assert noc == 5 and ious == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    noc, ious = clicks_to_iou(lambda clicks: np.zeros_like(g), g, 0.85, 3)
    assert noc == 3 and ious == [0.0, 0.0, 0.0]


def test_clicks_to_iou_many_equals_one_object_at_a_time():
    rng = np.random.default_rng(0)
    truths = [_square(n=16, at=tuple(rng.integers(0, 8, 2)), side=int(rng.integers(3, 8)))
              for _ in range(6)]

    def blob(clicks, shape):  # a square around each positive click, cut by negatives
        p = np.zeros(shape, bool)
        for r, c, pos in clicks:
            p[max(0, r - 2):r + 3, max(0, c - 2):c + 3] = pos
        return p

    calls = []

    def many(asks):
        calls.append(len(asks))
        return [blob(c, truths[j].shape) for j, c in asks]

    batched = clicks_to_iou_many(many, truths, 0.85, 6)
    alone = [clicks_to_iou(lambda c, t=t: blob(c, t.shape), t, 0.85, 6) for t in truths]
    assert batched == alone
    assert len(calls) == max(n for n, _ in alone)  # one call per round, not per object
    assert calls == sorted(calls, reverse=True) and calls[0] == len(truths)
    assert {n for n, _ in alone} != {6}  # some objects finish early, some do not
