"""CM3 causal masking: span sampling statistics, the transform, its weights and its inverse."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnimask.train.objectives.cm3 import cm3_invert, cm3_transform, sample_spans

SENTINELS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
END_SPAN = 17
END_DOC = 18


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _check_spans(spans, length, allowed=None):
    prev_end = 0
    for start, end in spans:
        assert prev_end <= start < end <= length, spans
        if allowed is not None:
            assert all(allowed[start:end]), (spans, allowed)
        prev_end = end


def test_transform_layout_and_weights_on_a_known_document():
    tokens = [100, 101, 102, 103, 104, 105, 106]
    out, weights = cm3_transform(tokens, [(1, 3), (5, 6)], SENTINELS, END_SPAN, END_DOC)
    assert out == [100, 1, 103, 104, 2, 106, 1, 101, 102, 17, 2, 105, 17, 18]
    assert weights == [0, 0, 1, 1, 0, 1, 0, 1, 1, 1, 0, 1, 1, 1]
    assert cm3_invert(out, SENTINELS, END_SPAN, END_DOC) == tokens
    out, weights = cm3_transform(tokens, [], SENTINELS, END_SPAN, None)
    assert out == tokens and weights == [0] + [1] * 6


@settings(max_examples=150, deadline=None)
@given(tokens=st.lists(st.integers(20, 5000), min_size=0, max_size=60),
       seed=st.integers(0, 2**31 - 1), lam=st.floats(0.0, 6.0), end_doc=st.booleans(),
       allowed_seed=st.one_of(st.none(), st.integers(0, 1000)))
def test_transform_is_invertible(tokens, seed, lam, end_doc, allowed_seed):
    allowed = None
    if allowed_seed is not None:
        allowed = (torch.rand(len(tokens), generator=_gen(allowed_seed)) < 0.7).tolist()
    spans = sample_spans(len(tokens), _gen(seed), poisson_lambda=lam, allowed=allowed)
    _check_spans(spans, len(tokens), allowed)
    doc_end = END_DOC if end_doc else None
    out, weights = cm3_transform(tokens, spans, SENTINELS, END_SPAN, doc_end)
    assert len(out) == len(weights) == len(tokens) + 3 * len(spans) + end_doc
    assert cm3_invert(out, SENTINELS, END_SPAN, doc_end) == tokens
    for j, (tok, w) in enumerate(zip(out, weights)):
        assert w == (0.0 if j == 0 or tok in SENTINELS else 1.0)


def test_mean_number_of_spans_is_one_plus_exp_minus_lambda():
    gen = _gen(0)
    counts = [len(sample_spans(100, gen, max_spans=16, poisson_lambda=1.0)) for _ in range(4000)]
    assert abs(sum(counts) / len(counts) - (1 + math.exp(-1))) < 0.05
    assert min(counts) == 1


def test_span_count_is_capped():
    gen = _gen(1)
    counts = [len(sample_spans(1000, gen, max_spans=3, poisson_lambda=8.0)) for _ in range(50)]
    assert max(counts) == 3
    # only two non-overlapping spans with a gap fit in 4 tokens
    assert all(len(sample_spans(4, gen, poisson_lambda=20.0)) == 2 for _ in range(20))
    assert sample_spans(1, gen) == [(0, 1)]
    assert sample_spans(0, gen) == []


def test_spans_are_sorted_non_overlapping_and_inside_allowed():
    for seed in range(200):
        length = 5 + seed % 60
        allowed = (torch.rand(length, generator=_gen(seed + 7)) < 0.6).tolist()
        spans = sample_spans(length, _gen(seed), poisson_lambda=3.0, allowed=allowed)
        _check_spans(spans, length, allowed)
        assert spans or not any(allowed)
    assert sample_spans(5, _gen(0), allowed=[False] * 5) == []


@pytest.mark.parametrize(("allowed", "expected"), [
    (None, [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]),
    ([True, True, False, True], [(0, 1), (0, 2), (1, 2), (3, 4)]),
])
def test_single_span_positions_are_uniform(allowed, expected):
    length = 3 if allowed is None else len(allowed)
    gen = _gen(4)
    seen = Counter(tuple(sample_spans(length, gen, max_spans=1, allowed=allowed))[0]
                   for _ in range(3000))
    assert sorted(seen) == expected
    for span in expected:
        assert abs(seen[span] / 3000 - 1 / len(expected)) < 0.03


def test_sampling_is_deterministic_for_a_seed():
    a = [sample_spans(200, _gen(s), poisson_lambda=4.0) for s in range(10)]
    b = [sample_spans(200, _gen(s), poisson_lambda=4.0) for s in range(10)]
    assert a == b and len({tuple(x) for x in a}) > 5


@pytest.mark.parametrize("out", [
    [100, 1, 102, 1, 101, 17],  # missing end_doc
    [100, 1, 102, 1, 101, 18],  # moved span not closed
    [100, 1, 102, 1, 17, 18],  # empty moved span
    [100, 2, 102, 2, 101, 17, 18],  # sentinels must start at s0
    [100, 1, 2, 2, 5, 17, 1, 6, 17, 18],  # sentinels out of order
    [100, 1, 102, 1, 101, 17, 55, 18],  # trailing tokens
    [100, 17, 101, 18],  # end_span without spans
])
def test_invert_rejects_malformed_documents(out):
    with pytest.raises(ValueError):
        cm3_invert(out, SENTINELS, END_SPAN, END_DOC)


@pytest.mark.parametrize("spans", [[(2, 1)], [(0, 3), (2, 4)], [(0, 9)], [(3, 4), (0, 1)]])
def test_transform_rejects_bad_spans(spans):
    with pytest.raises(ValueError):
        cm3_transform(list(range(100, 108)), spans, SENTINELS, END_SPAN, END_DOC)


def test_transform_rejects_special_tokens_and_too_many_spans():
    with pytest.raises(ValueError):
        cm3_transform([100, 1, 101], [(0, 1)], SENTINELS, END_SPAN, END_DOC)
    with pytest.raises(ValueError):
        cm3_transform([100, 101, 102, 103], [(0, 1), (2, 3)], [1], END_SPAN, END_DOC)
