"""The objective mix schedule: ``mix_start`` moving linearly to ``mix``."""

from __future__ import annotations

import torch

from omnimask.train.objectives.base import ObjectivesConfig, mix_weights

NAMES = ["cm3", "itc", "itm", "mlm"]


def test_mix_moves_linearly_from_start_to_end():
    cfg = ObjectivesConfig(mix={"cm3": 4, "mlm": 2}, mix_start={"itc": 6, "itm": 2},
                           mix_ramp_steps=100)
    assert mix_weights(NAMES, cfg, 0).tolist() == [0, 6, 2, 0]
    assert mix_weights(NAMES, cfg, 50).tolist() == [2, 3, 1, 1]
    assert mix_weights(NAMES, cfg, 100).tolist() == [4, 0, 0, 2]
    assert mix_weights(NAMES, cfg, 10_000).tolist() == [4, 0, 0, 2]  # stays at mix


def test_without_start_the_mix_is_constant():
    cfg = ObjectivesConfig(mix={"cm3": 4, "mlm": 2}, mix_ramp_steps=100)
    for step in (0, 50, 100):
        assert mix_weights(NAMES, cfg, step).tolist() == [4, 0, 0, 2]


def test_draws_follow_the_schedule():
    cfg = ObjectivesConfig(mix={"cm3": 1}, mix_start={"itc": 1}, mix_ramp_steps=1000)
    g = torch.Generator().manual_seed(0)

    def share_itc(step: int) -> float:
        w = mix_weights(NAMES, cfg, step)
        draws = torch.multinomial(w, 4000, replacement=True, generator=g)
        return float((draws == NAMES.index("itc")).float().mean())

    assert share_itc(0) == 1.0 and share_itc(1000) == 0.0
    assert abs(share_itc(250) - 0.75) < 0.03
