"""Masking transforms: rates, 80/10/10 split, unit integrity, determinism and validation."""

from __future__ import annotations

import pytest
import torch

from omnimask.train.objectives.masking import (
    blockwise_mask,
    mlm_mask,
    region_mask,
    span_mask,
)

MASK_ID = 999
RANGE = (1000, 2000)  # random ids never collide with the original ids (< 500) or MASK_ID


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 500, (n,), generator=_gen(seed))


def _selected(targets: torch.Tensor) -> torch.Tensor:
    return targets != -100


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """Maximal runs [s, e) of True."""
    runs, start = [], None
    for i, v in enumerate(mask.tolist() + [False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            runs.append((start, i))
            start = None
    return runs


# --------------------------------------------------------------------------------------------
# mlm_mask
# --------------------------------------------------------------------------------------------


def test_mlm_replacement_split_is_80_10_10():
    gen = _gen(1)
    counts = torch.zeros(3)
    total = 0
    while total < 20000:
        ids = _ids(2000, seed=total)
        inputs, targets = mlm_mask(ids, gen, mask_id=MASK_ID, random_range=RANGE)
        sel = _selected(targets)
        got = inputs[sel]
        is_random = (got >= RANGE[0]) & (got < RANGE[1])
        counts += torch.tensor([(got == MASK_ID).sum(), is_random.sum(), (got == ids[sel]).sum()])
        total += int(sel.sum())
    frac = counts / total
    assert counts.sum() == total  # every selected position is one of the three cases
    assert abs(frac[0] - 0.8) < 0.02 and abs(frac[1] - 0.1) < 0.02 and abs(frac[2] - 0.1) < 0.02


@pytest.mark.parametrize("n", [7, 20, 64, 333])
def test_mlm_selects_round_prob_of_maskable_and_keeps_targets(n):
    ids = _ids(n)
    maskable = torch.rand(n, generator=_gen(n)) < 0.7
    inputs, targets = mlm_mask(ids, _gen(3), mask_id=MASK_ID, random_range=RANGE,
                               maskable=maskable)
    sel = _selected(targets)
    assert int(sel.sum()) == max(1, round(0.15 * int(maskable.sum())))
    assert torch.equal(targets[sel], ids[sel])
    assert torch.equal(inputs[~sel], ids[~sel])


def test_mlm_rate_is_exact_over_many_sequences():
    sel = sum(int(_selected(mlm_mask(_ids(128, s), _gen(s), mask_id=MASK_ID, random_range=RANGE,
                                     prob=0.3)[1]).sum()) for s in range(50))
    assert sel == 50 * round(0.3 * 128)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("max_ngram", [1, 2])
def test_mlm_masks_at_least_one_on_short_inputs(n, max_ngram):
    for seed in range(20):
        _, targets = mlm_mask(_ids(n), _gen(seed), mask_id=MASK_ID, random_range=RANGE,
                              max_ngram=max_ngram)
        assert 1 <= int(_selected(targets).sum()) <= max_ngram


def test_mlm_never_selects_unmaskable_positions():
    for seed in range(30):
        ids = _ids(50, seed)
        maskable = torch.rand(50, generator=_gen(seed + 100)) < 0.5
        inputs, targets = mlm_mask(ids, _gen(seed), mask_id=MASK_ID, random_range=RANGE,
                                   prob=0.5, maskable=maskable, max_ngram=seed % 4 + 1)
        assert not _selected(targets)[~maskable].any()
        assert torch.equal(inputs[~maskable], ids[~maskable])
    none = torch.zeros(50, dtype=torch.bool)
    inputs, targets = mlm_mask(_ids(50), _gen(0), mask_id=MASK_ID, random_range=RANGE,
                               maskable=none)
    assert not _selected(targets).any() and torch.equal(inputs, _ids(50))


def _word_ids(word_starts: torch.Tensor) -> torch.Tensor:
    starts = word_starts.clone()
    starts[0] = True
    return torch.cumsum(starts.long(), 0) - 1


@pytest.mark.parametrize("max_ngram", [1, 3])
def test_whole_word_masking_never_splits_words(max_ngram):
    covered = total = 0
    for seed in range(40):
        n = 120
        word_starts = torch.rand(n, generator=_gen(seed)) < 0.4
        maskable = torch.ones(n, dtype=torch.bool)
        maskable[seed % n] = False  # the word containing this position is never selected
        _, targets = mlm_mask(_ids(n, seed), _gen(seed), mask_id=MASK_ID, random_range=RANGE,
                              maskable=maskable, word_starts=word_starts, max_ngram=max_ngram)
        sel = _selected(targets)
        words = _word_ids(word_starts)
        for w in words.unique():
            in_word = sel[words == w]
            assert in_word.all() or not in_word.any(), f"word {int(w)} split"
        assert not sel[words == words[seed % n]].any()
        covered += int(sel.sum())
        total += n
    assert 0.14 < covered / total < 0.22


def test_ngram_spans_are_contiguous_and_budgeted():
    n, max_ngram = 1000, 3
    run_lengths = []
    for seed in range(20):
        maskable = torch.ones(n, dtype=torch.bool)
        maskable[::37] = False
        _, targets = mlm_mask(_ids(n, seed), _gen(seed), mask_id=MASK_ID, random_range=RANGE,
                              maskable=maskable, max_ngram=max_ngram)
        sel = _selected(targets)
        budget = round(0.15 * int(maskable.sum()))
        assert budget <= int(sel.sum()) <= budget + max_ngram - 1
        run_lengths += [e - s for s, e in _runs(sel)]
    mean = sum(run_lengths) / len(run_lengths)
    # p(n) ∝ 1/n over 1..3 has mean 18/11 = 1.64; single-token masking gives runs of ~1.2
    assert 1.5 < mean < 1.95
    _, uni = mlm_mask(_ids(n), _gen(0), mask_id=MASK_ID, random_range=RANGE)
    uni_runs = [e - s for s, e in _runs(_selected(uni))]
    assert sum(uni_runs) / len(uni_runs) < 1.3


def test_ngram_spans_do_not_jump_over_unmaskable_positions():
    n = 200
    maskable = torch.arange(n) % 2 == 0  # no two maskable positions are adjacent
    _, targets = mlm_mask(_ids(n), _gen(5), mask_id=MASK_ID, random_range=RANGE,
                          maskable=maskable, max_ngram=4)
    # every span is a single position, so the budget is met exactly
    assert int(_selected(targets).sum()) == round(0.15 * 100)


def test_mlm_is_deterministic_for_a_seed():
    ids = _ids(300)
    kw = dict(mask_id=MASK_ID, random_range=RANGE, max_ngram=3,
              word_starts=torch.rand(300, generator=_gen(9)) < 0.5)
    a = mlm_mask(ids, _gen(11), **kw)
    b = mlm_mask(ids, _gen(11), **kw)
    c = mlm_mask(ids, _gen(12), **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_mlm_does_not_touch_global_rng():
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    mlm_mask(_ids(100), _gen(1), mask_id=MASK_ID, random_range=RANGE, max_ngram=2)
    assert torch.equal(torch.rand(3), before)


@pytest.mark.parametrize("kwargs", [
    dict(prob=0.0), dict(prob=1.5), dict(random_range=(5, 5)), dict(max_ngram=0),
    dict(maskable=torch.ones(9, dtype=torch.bool)), dict(maskable=torch.ones(10)),
    dict(word_starts=torch.ones(3, dtype=torch.bool)),
])
def test_mlm_rejects_bad_arguments(kwargs):
    args = dict(mask_id=MASK_ID, random_range=RANGE) | kwargs
    with pytest.raises(ValueError):
        mlm_mask(_ids(10), _gen(0), **args)


def test_mlm_rejects_non_integer_ids():
    with pytest.raises(ValueError):
        mlm_mask(_ids(10).float(), _gen(0), mask_id=MASK_ID, random_range=RANGE)


# --------------------------------------------------------------------------------------------
# region_mask
# --------------------------------------------------------------------------------------------


def test_region_mask_rate_and_at_least_one():
    gen = _gen(0)
    masks = torch.stack([region_mask(100, gen) for _ in range(200)])
    assert abs(masks.float().mean().item() - 0.15) < 0.01
    for seed in range(50):
        for n in (1, 2, 5):
            assert region_mask(n, _gen(seed)).sum() >= 1
    assert torch.equal(region_mask(36, _gen(4)), region_mask(36, _gen(4)))
    with pytest.raises(ValueError):
        region_mask(10, gen, prob=0.0)


# --------------------------------------------------------------------------------------------
# span_mask
# --------------------------------------------------------------------------------------------


def test_span_mask_fraction_matches_hubert():
    gen = _gen(0)
    frac = torch.stack([span_mask(500, gen).float().mean() for _ in range(1000)]).mean().item()
    assert 0.50 <= frac <= 0.62


def test_span_mask_runs_are_whole_spans():
    gen = _gen(1)
    for _ in range(50):
        mask = span_mask(300, gen)
        assert all(e - s >= 10 for s, e in _runs(mask))
    one = span_mask(100, gen, start_prob=0.0)  # min_spans=1 -> exactly one span
    assert _runs(one)[0][1] - _runs(one)[0][0] == 10 and len(_runs(one)) == 1
    assert not span_mask(100, gen, start_prob=0.0, min_spans=0).any()


def test_span_mask_short_inputs_leave_a_frame_visible():
    for n in (2, 5, 10):
        mask = span_mask(n, _gen(n))
        assert int(mask.sum()) == n - 1 and not mask[-1]
    assert not span_mask(1, _gen(0)).any()
    assert span_mask(0, _gen(0)).numel() == 0


def test_span_mask_is_deterministic_and_validates():
    assert torch.equal(span_mask(400, _gen(3)), span_mask(400, _gen(3)))
    assert not torch.equal(span_mask(400, _gen(3)), span_mask(400, _gen(4)))
    with pytest.raises(ValueError):
        span_mask(10, _gen(0), span=0)
    with pytest.raises(ValueError):
        span_mask(10, _gen(0), start_prob=1.5)


# --------------------------------------------------------------------------------------------
# blockwise_mask
# --------------------------------------------------------------------------------------------


def test_blockwise_mask_ratio_and_cap():
    gen = _gen(0)
    masks = torch.stack([blockwise_mask(14, 14, gen) for _ in range(200)])
    assert masks.shape == (200, 196)
    per = masks.float().mean(1)
    assert per.max().item() <= round(0.4 * 196) / 196  # never more than the target
    assert 0.3 <= per.mean().item() <= 0.5
    assert per.min().item() >= 0.3


def test_blockwise_mask_is_blocky_and_deterministic():
    a = blockwise_mask(14, 14, _gen(7))
    assert torch.equal(a, blockwise_mask(14, 14, _gen(7)))
    assert not torch.equal(a, blockwise_mask(14, 14, _gen(8)))
    # blocks, not scattered cells: most masked cells have a masked 4-neighbour
    grid = torch.stack([blockwise_mask(14, 14, _gen(s)).view(14, 14) for s in range(20)])
    pad = torch.nn.functional.pad(grid.float(), (1, 1, 1, 1))
    neigh = pad[:, :-2, 1:-1] + pad[:, 2:, 1:-1] + pad[:, 1:-1, :-2] + pad[:, 1:-1, 2:]
    assert (neigh[grid] > 0).float().mean() > 0.95
    with pytest.raises(ValueError):
        blockwise_mask(14, 14, _gen(0), min_aspect=0.0)
    with pytest.raises(ValueError):
        blockwise_mask(14, 14, _gen(0), max_block=2)
