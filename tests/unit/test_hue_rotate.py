"""The hue turn of segmentation's colour augmentation: a rotation about RGB's grey axis."""

from __future__ import annotations

import math

import torch

from omnimask.modalities.image.processor import hue_rotate


def _image() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, 8, 8), generator=g, dtype=torch.uint8)


def test_a_third_of_a_turn_cycles_the_channels_and_a_full_turn_is_the_identity():
    x = _image()
    assert torch.equal(hue_rotate(x, 0.0), x)
    assert torch.equal(hue_rotate(x, 2 * math.pi), x)
    assert torch.equal(hue_rotate(x, 2 * math.pi / 3), x[[2, 0, 1]])  # red -> green
    assert torch.equal(hue_rotate(x, 4 * math.pi / 3), x[[1, 2, 0]])


def test_greys_stay_and_brightness_is_kept():
    grey = torch.arange(0, 256, 4, dtype=torch.uint8).repeat(3, 1)[:, None, :]
    assert torch.equal(hue_rotate(grey, 1.0), grey)
    red = torch.tensor([150, 90, 90], dtype=torch.uint8)[:, None, None]
    out = hue_rotate(red, 1.0).float()
    assert abs(out.mean() - red.float().mean()) <= 1  # unclipped: the grey level stays
    assert not torch.equal(out, red.float())  # and the colour moved
