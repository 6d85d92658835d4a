"""Segmentation losses and matching against hand-computed values and brute force."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from omnimask.heads.segment_losses import (
    bce_loss,
    dice_loss,
    hungarian,
    mask_losses,
    match,
    pairwise_bce,
    pairwise_dice,
    point_sample,
    uncertain_points,
)


def test_hungarian_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    for q, t in [(3, 3), (5, 3), (6, 2), (4, 1)]:
        for _ in range(10):
            c = torch.rand(q, t, generator=g)
            rows, cols = hungarian(c)
            best = min(sum(c[p[j], j] for j in range(t))
                       for p in itertools.permutations(range(q), t))
            assert float(c[rows, cols].sum()) == pytest.approx(float(best), abs=1e-6)
            assert len(set(rows.tolist())) == t and sorted(cols.tolist()) == list(range(t))
    with pytest.raises(ValueError, match="NaN"):
        hungarian(torch.tensor([[float("nan")]]))


def test_dice_by_hand():
    big = 30.0  # sigmoid ~ 1 / ~ 0
    t = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert float(dice_loss(torch.tensor([[big, big, -big, -big]]), t, 1)) == pytest.approx(0, abs=1e-6)
    # disjoint: 1 - 1 / (2 + 2 + 1)
    assert float(dice_loss(torch.tensor([[-big, -big, big, big]]), t, 1)) == pytest.approx(0.8)
    # logits 0 (p = 1/2): 1 - (2 * 1 + 1) / (2 + 2 + 1) = 0.4; two masks over num_masks 2
    z = torch.zeros(2, 4)
    assert float(dice_loss(z, t.expand(2, -1), 2)) == pytest.approx(0.4)


def test_bce_by_hand():
    t = torch.tensor([[1.0, 0.0]])
    assert float(bce_loss(torch.zeros(1, 2), t, 1)) == pytest.approx(math.log(2))
    x = torch.tensor([[2.0, -1.0]])
    want = (math.log1p(math.exp(-2)) + math.log1p(math.exp(-1))) / 2
    assert float(bce_loss(x, t, 1)) == pytest.approx(want)


def test_pairwise_costs_equal_the_per_pair_losses():
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(4, 9, generator=g), (torch.rand(3, 9, generator=g) > 0.5).float()
    d, b = pairwise_dice(x, t), pairwise_bce(x, t)
    for i in range(4):
        for j in range(3):
            assert float(d[i, j]) == pytest.approx(float(dice_loss(x[i:i + 1], t[j:j + 1], 1)),
                                                    abs=1e-6)
            assert float(b[i, j]) == pytest.approx(
                float(F.binary_cross_entropy_with_logits(x[i], t[j])), abs=1e-6)


def test_point_sample_reads_pixel_centres():
    m = torch.arange(16.0).view(1, 1, 4, 4)
    # the centre of pixel (row 1, column 2) is x = 2.5 / 4, y = 1.5 / 4
    v = point_sample(m, torch.tensor([[[2.5 / 4, 1.5 / 4]]]))
    assert float(v) == 6.0


def test_uncertain_points_prefer_the_boundary():
    logits = torch.full((1, 1, 32, 32), 10.0)
    logits[..., 8:24] = 0.0  # a band of uncertainty: half the columns
    g = torch.Generator().manual_seed(0)
    c = uncertain_points(logits, 40, 3.0, 0.75, g)
    assert c.shape == (1, 40, 2)
    x = c[0, :30, 0] * 32
    assert ((x > 7) & (x < 25)).all()  # ~60 of the 120 candidates lie in the band
    assert ((c[0, 30:, 0] * 32 < 7) | (c[0, 30:, 0] * 32 > 25)).any()  # the rest uniform


def test_match_finds_the_right_queries():
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(2, 16, 16)
    masks[0, :8], masks[1, 8:] = 1, 1
    pred = torch.full((4, 16, 16), -8.0)
    pred[2, :8] = 8.0  # query 2 draws target 0, query 0 target 1
    pred[0, 8:] = 8.0
    cls = torch.zeros(4, 4)
    cls[2, 1], cls[0, 3] = 5.0, 5.0
    rows, cols = match(cls, pred, torch.tensor([1, 3]), masks, 64, (2.0, 5.0, 5.0), g)
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 2, 1: 0}


def test_mask_losses_small_for_the_truth_and_differentiable():
    g = torch.Generator().manual_seed(0)
    t = torch.zeros(1, 16, 16)
    t[0, 4:12, 4:12] = 1
    good = (t * 40 - 20).requires_grad_()
    b, d = mask_losses(good, t, 1.0, 64, gen=g)
    bad = (-good).detach().requires_grad_()
    b2, d2 = mask_losses(bad, t, 1.0, 64, gen=g)
    # importance sampling picks the boundary, where bilinear labels are fractional
    assert d.item() < 0.5 < d2.item() and b.item() < b2.item()
    (b2 + d2).backward()
    assert bad.grad is not None and bad.grad.abs().sum() > 0
