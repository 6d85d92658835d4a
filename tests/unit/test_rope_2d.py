"""2-D rotary queries and keys (``model.trunk.rope_2d``): the rotation against explicit 2x2
matrices, image-to-image attention that sees only (row, col) offsets, and the trunk's
paths (target rows, packed samples) unchanged by it."""

from __future__ import annotations

import math

import pytest
import torch

from omnimask.fusion.packing import Segment, pack
from omnimask.fusion.trunk import Trunk, TrunkConfig, rope_2d_angles, rotate


def test_each_pair_turns_by_its_row_or_column_angle_float64():
    g = torch.Generator().manual_seed(0)
    D, base = 8, 100.0
    rc = torch.tensor([[0, 0], [3, 1], [-1, -1], [2, 5]])
    x = torch.randn(4, 2, D, generator=g, dtype=torch.float64)
    got = rotate(x, rope_2d_angles(rc, D, base).double())
    n = D // 4
    for t, (r, c) in enumerate(rc.tolist()):
        for i in range(D // 2):  # pair (i, i + D/2): rows for i < n, columns after
            pos = 0 if r < 0 else (r if i < n else c)
            a = pos * base ** (-(i % n) / n)
            rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]],
                               dtype=torch.float64)
            want = x[t, :, [i, i + D // 2]] @ rot.T
            torch.testing.assert_close(got[t, :, [i, i + D // 2]], want, atol=1e-6, rtol=0)


def test_scores_depend_only_on_the_offset():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 1, 1, 16, generator=g, dtype=torch.float64)

    def score(a, b):
        ang = rope_2d_angles(torch.tensor([a, b]), 16, 100.0).double()
        return float((rotate(q, ang[:1]) * rotate(k, ang[1:])).sum())

    assert score([1, 2], [4, 0]) == pytest.approx(score([5, 7], [8, 5]), abs=1e-6)
    assert score([1, 2], [4, 0]) != pytest.approx(score([1, 2], [0, 4]), abs=1e-3)


def _trunk(**kw):
    torch.manual_seed(0)
    return Trunk(TrunkConfig(vocab_size=60, dim=32, heads=2, layers=2, ffn_dim=48,
                             attention_backend="sdpa", grid_positions=False, **kw)).double()


def _images(shift=(0, 0), swap=False, text=True):
    """Two samples of caption + 3 x 3 image, the grids moved by ``shift`` (or two rows
    swapped)."""
    g = torch.Generator().manual_seed(2)
    out = []
    for n in (4, 2):
        ids = torch.randint(0, 60, (9,), generator=g)
        r, c = torch.arange(9) // 3, torch.arange(9) % 3
        if swap:
            r = torch.tensor([1, 1, 1, 0, 0, 0, 2, 2, 2])
        rc = torch.stack([r + shift[0], c + shift[1]], 1)
        cap = torch.randint(0, 60, (n,), generator=g)
        out.append([Segment("text", ids=cap)] * text + [Segment("image", ids=ids, rc=rc)])
    return pack(out)


def test_moving_every_image_changes_nothing_and_moving_rows_apart_does():
    """Without learned grid embeddings a trunk with rope_2d sees an image's layout only
    through the offsets between its patches (text, unturned, sees where the image is);
    without rope_2d it does not see the layout at all."""
    t = _trunk(rope_2d=True).eval()
    with torch.no_grad():
        h = t(_images(text=False))
        torch.testing.assert_close(t(_images(shift=(4, 7), text=False)), h, atol=1e-6, rtol=0)
        assert (t(_images(swap=True, text=False)) - h).abs().max() > 1e-3
        assert (t(_images(shift=(4, 7))) - t(_images())).abs().max() > 1e-3
        flat = _trunk(rope_2d=False).eval()
        torch.testing.assert_close(flat(_images(swap=True)), flat(_images()), atol=1e-10,
                                   rtol=0)


@pytest.mark.parametrize("mask", ["bidirectional", "causal"])
def test_outputs_at_rows_equal_the_full_forward_float64(mask):
    t = _trunk(rope_2d=True).train()
    b = _images()
    pos = torch.tensor([12, 2, 20, 5])  # image and text rows, any order
    got = []
    for fast in (True, False):
        t.zero_grad()
        h = t(b, mask, outputs=pos) if fast else t(b, mask)[pos]
        (t.mlm(h).sin().sum()).backward()
        got.append((h, {n: p.grad.clone() for n, p in t.named_parameters()
                        if p.grad is not None}))
    (hf, gf), (hs, gs) = got
    torch.testing.assert_close(hf, hs, atol=1e-6, rtol=1e-6)
    for n in gs:
        torch.testing.assert_close(gf[n], gs[n], atol=1e-6, rtol=1e-6, msg=n)


def test_a_head_size_not_divisible_by_four_is_refused():
    with pytest.raises(ValueError, match="model.trunk.rope_2d"):
        TrunkConfig(dim=12, heads=2, rope_2d=True)
