"""Packing: per-sample round trips, boundaries, positions, budgets."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnimask.fusion.packing import IGNORE, Segment, pack, pack_to_budget, sample_index, unpack


def _sample(seed, n_text, grid, n_speech, feat_dim=5):
    g = torch.Generator().manual_seed(seed)
    segs = [Segment("text", ids=torch.randint(0, 100, (n_text,), generator=g),
                    targets=torch.where(torch.rand(n_text, generator=g) < 0.3,
                                        torch.randint(0, 100, (n_text,), generator=g),
                                        torch.full((n_text,), IGNORE)))]
    if grid:
        segs.append(Segment("image", features=torch.randn(grid[0] * grid[1], feat_dim, generator=g),
                            grid=grid))
    if n_speech:
        segs.append(Segment("speech", ids=torch.randint(200, 300, (n_speech,), generator=g)))
    return segs


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 20), st.sampled_from([None, (2, 3), (4, 4)]),
                          st.integers(0, 9)), min_size=1, max_size=6))
def test_pack_unpack_restores_every_sample(spec):
    samples = [_sample(i, *s) for i, s in enumerate(spec)]
    b = pack(samples)
    lens = [sum(len(s) for s in sample) for sample in samples]
    assert b.cu_seqlens.tolist() == [0, *torch.tensor(lens).cumsum(0).tolist()]
    assert b.max_seqlen == max(lens) and b.num_samples == len(samples)
    assert torch.equal(sample_index(b.cu_seqlens), torch.repeat_interleave(torch.arange(len(lens)),
                                                                           torch.tensor(lens)))
    for i, (ids, seg, pos, tgt) in enumerate(zip(unpack(b.ids, b.cu_seqlens),
                                                  unpack(b.segment, b.cu_seqlens),
                                                  unpack(b.position, b.cu_seqlens),
                                                  unpack(b.targets, b.cu_seqlens))):
        start = 0
        for k, s in enumerate(samples[i]):
            sl = slice(start, start + len(s))
            assert (seg[sl] == k).all() and torch.equal(pos[sl], torch.arange(len(s)))
            if s.ids is not None:
                assert torch.equal(ids[sl], s.ids)
            else:
                assert (ids[sl] == -1).all()
            want = s.targets if s.targets is not None else torch.full((len(s),), IGNORE)
            assert torch.equal(tgt[sl], want)
            start += len(s)
    if "image" in b.features:  # features sit exactly at their packed positions
        imgs = [s for sample in samples for s in sample if s.modality == "image"]
        assert torch.equal(b.features["image"], torch.cat([s.features for s in imgs]))
        assert (b.modality[b.feature_index["image"]] == 1).all()
        assert (b.ids[b.feature_index["image"]] == -1).all()


def test_grid_positions_and_targets():
    b = pack([_sample(0, 3, (2, 3), 2)])
    img = b.modality == 1
    assert b.position_2d[img].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    assert (b.position_2d[~img] == -1).all()
    assert torch.equal(b.target_positions, (b.targets != IGNORE).nonzero()[:, 0])


def test_bad_segments():
    with pytest.raises(ValueError, match="either ids or features"):
        Segment("text")
    with pytest.raises(ValueError, match="unknown modality"):
        Segment("video", ids=torch.tensor([1]))
    with pytest.raises(ValueError, match="grid"):
        Segment("image", features=torch.zeros(5, 2), grid=(2, 3))
    with pytest.raises(ValueError, match="empty"):
        Segment("text", ids=torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="positions"):
        unpack(torch.zeros(3), torch.tensor([0, 2], dtype=torch.int32))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=40), st.integers(50, 200))
def test_budget_bins(lengths, budget):
    bins = pack_to_budget(lengths, budget)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= budget for b in bins)
    # first fit leaves at most one bin half empty or worse
    assert sum(sum(lengths[i] for i in b) * 2 <= budget for b in bins) <= 1


def test_budget_rejects_long_samples():
    with pytest.raises(ValueError, match=r"samples \[1\] are longer"):
        pack_to_budget([3, 9], 8)


def test_group_slots_rank_each_element_within_its_group():
    from omnimask.fusion.packing import group_slots

    g = torch.tensor([2, 0, 2, 1, 0, 2, 0])
    slot, counts = group_slots(g, 4)
    seen = [0] * 4  # brute force: each element's count of earlier elements of its group
    want = []
    for x in g.tolist():
        want.append(seen[x])
        seen[x] += 1
    assert slot.tolist() == want and counts.tolist() == [3, 1, 3, 0]
