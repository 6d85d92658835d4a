"""CM3 causally-masked documents: move a few spans to the end of the document, behind sentinels.

Reference: Aghajanyan et al. 2022, "CM3: A Causal Masked Multimodal Model of the Internet"
(arXiv 2201.07520) and metaseq ``causal_masked_dataset.py``.  A document
``x0 [span A] x1 [span B] x2`` becomes ``x0 <s0> x1 <s1> x2 <s0> A <eos_span> <s1> B <eos_span>``
(plus an optional end-of-document token) and is trained left to right.

Departures from metaseq:

* the number of spans is ``clamp(Poisson(lambda), 1, max_spans)`` (metaseq clamps to
  ``[0, n_sentinels - 1]`` and leaves the document unchanged on 0);
* span positions are uniform over all sets of non-overlapping, non-empty spans (2n distinct cut
  points from ``range(length + 1)`` paired in order), so two spans are always separated by at
  least one unmasked token; metaseq draws ``n**2`` random candidate spans and keeps the
  non-intersecting ones greedily, and may return fewer;
* optional ``allowed`` positions (spans never cover a disallowed token);
* no truncation to the block size: the caller packs and truncates;
* per-position loss weights with zero weight on predicting any sentinel.

All functions work on python lists of ints; randomness comes only from the given generator.
"""

from __future__ import annotations

from math import comb

import torch

Span = tuple[int, int]
"""A half-open token range ``[start, end)``."""


# ---------------------------------------------------------------------------------------------
# span sampling
# ---------------------------------------------------------------------------------------------


def _runs(length: int, allowed: list[bool] | None) -> list[Span]:
    """Maximal runs ``[s, e)`` of allowed positions."""
    if allowed is None:
        return [(0, length)] if length > 0 else []
    runs: list[Span] = []
    start = None
    for i, ok in enumerate(allowed):
        if ok and start is None:
            start = i
        elif not ok and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, length))
    return runs


def _allocate(points: list[int], n: int, gen: torch.Generator) -> list[int]:
    """Spans per run, so that the whole configuration is uniform over valid cut-point sets.

    Run r offers ``points[r]`` cut points and holds ``k`` spans in ``comb(points[r], 2k)`` ways;
    ``ways[r][j]`` counts the configurations of ``j`` spans over runs ``r..``.
    """
    runs = len(points)
    ways = [[0] * (n + 1) for _ in range(runs + 1)]
    ways[runs][0] = 1
    for r in range(runs - 1, -1, -1):
        for j in range(n + 1):
            ways[r][j] = sum(comb(points[r], 2 * kk) * ways[r + 1][j - kk] for kk in range(j + 1))
    counts = []
    left = n
    for r in range(runs):
        if left == 0:
            counts.append(0)
            continue
        weights = [comb(points[r], 2 * kk) * ways[r + 1][left - kk] for kk in range(left + 1)]
        u = torch.rand((), generator=gen, dtype=torch.float64).item()
        pick = max(kk for kk, w in enumerate(weights) if w > 0)  # fallback for rounding
        acc = 0.0
        for kk, w in enumerate(weights):
            acc += w / ways[r][left]
            if w > 0 and u < acc:
                pick = kk
                break
        counts.append(pick)
        left -= pick
    return counts


def _check_sample_args(length: int, max_spans: int, poisson_lambda: float,
                       allowed: list[bool] | None) -> None:
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    if max_spans < 1:
        raise ValueError(f"max_spans must be >= 1, got {max_spans}")
    if poisson_lambda < 0:
        raise ValueError(f"poisson_lambda must be >= 0, got {poisson_lambda}")
    if allowed is not None and len(allowed) != length:
        raise ValueError(f"allowed has {len(allowed)} entries for a length of {length}")


def sample_spans(length: int, gen: torch.Generator, *, max_spans: int = 16,
                 poisson_lambda: float = 1.0, allowed: list[bool] | None = None) -> list[Span]:
    """Sorted, non-overlapping, non-empty spans ``[start, end)`` to move to the end.

    The number of spans is ``clamp(Poisson(poisson_lambda), 1, max_spans)``, reduced to the most
    that fit (spans are separated by at least one token).  Configurations are uniform: 2n
    distinct cut points paired in order, all inside one run of ``allowed`` positions per span.
    At least one span is returned whenever some position is allowed.
    """
    _check_sample_args(length, max_spans, poisson_lambda, allowed)
    draw = torch.poisson(torch.tensor([float(poisson_lambda)], dtype=torch.float64),
                         generator=gen)
    n = min(max(int(draw.item()), 1), max_spans)
    runs = _runs(length, allowed)
    points = [e - s + 1 for s, e in runs]
    n = min(n, sum(p // 2 for p in points))
    if n == 0:
        return []
    spans: list[Span] = []
    for (s, _), p, kk in zip(runs, points, _allocate(points, n, gen)):
        if kk == 0:
            continue
        cuts = sorted((torch.randperm(p, generator=gen)[: 2 * kk] + s).tolist())
        spans.extend((cuts[i], cuts[i + 1]) for i in range(0, 2 * kk, 2))
    return spans


# ---------------------------------------------------------------------------------------------
# transform and inverse
# ---------------------------------------------------------------------------------------------


def _check_transform_args(tokens: list[int], spans: list[Span], sentinels: list[int],
                          end_span: int) -> None:
    if len(spans) > len(sentinels):
        raise ValueError(f"{len(spans)} spans but only {len(sentinels)} sentinels")
    if len(set(sentinels)) != len(sentinels) or end_span in sentinels:
        raise ValueError("sentinels must be distinct and differ from end_span")
    special = set(sentinels) | {end_span}
    if any(t in special for t in tokens):
        raise ValueError("tokens must not contain sentinel or end_span ids")
    prev_end = 0
    for start, end in spans:
        if not prev_end <= start < end <= len(tokens):
            raise ValueError(f"spans must be sorted, non-empty, non-overlapping and inside the "
                             f"{len(tokens)} tokens, got {spans}")
        prev_end = end


def cm3_transform(tokens: list[int], spans: list[Span], sentinels: list[int], end_span: int,
                  end_doc: int | None) -> tuple[list[int], list[float]]:
    """Causally-masked document and its per-position loss weights.

    Span ``i`` is replaced in place by ``sentinels[i]``; then, for each span in order,
    ``sentinels[i]``, the span's tokens and ``end_span`` are appended; then ``end_doc`` if given.
    ``weights[j]`` weighs the prediction of ``out[j]`` from ``out[:j]``: 0.0 at ``j = 0`` and
    wherever ``out[j]`` is a sentinel, 1.0 elsewhere.
    """
    _check_transform_args(tokens, spans, sentinels, end_span)
    out: list[int] = []
    tail: list[int] = []
    prev = 0
    for i, (start, end) in enumerate(spans):
        out.extend(tokens[prev:start])
        out.append(sentinels[i])
        tail.append(sentinels[i])
        tail.extend(tokens[start:end])
        tail.append(end_span)
        prev = end
    out.extend(tokens[prev:])
    out.extend(tail)
    if end_doc is not None:
        out.append(end_doc)
    special = set(sentinels)
    weights = [0.0 if t in special else 1.0 for t in out]
    if weights:
        weights[0] = 0.0
    return out, weights


def _split_tail(tail: list[int], k: int, sentinels: list[int], end_span: int) -> list[list[int]]:
    """Parse ``<s0> A <eos_span> <s1> B <eos_span> ...`` into the k span bodies."""
    special = set(sentinels) | {end_span}
    bodies: list[list[int]] = []
    pos = 0
    for i in range(k):
        if pos >= len(tail) or tail[pos] != sentinels[i]:
            raise ValueError(f"malformed CM3 document: expected sentinel {sentinels[i]} at the "
                             f"start of moved span {i}")
        end = pos + 1
        while end < len(tail) and tail[end] not in special:
            end += 1
        if end >= len(tail) or tail[end] != end_span or end == pos + 1:
            raise ValueError(f"malformed CM3 document: moved span {i} is empty or not closed")
        bodies.append(tail[pos + 1: end])
        pos = end + 1
    if pos != len(tail):
        raise ValueError("malformed CM3 document: trailing tokens after the last moved span")
    return bodies


def cm3_invert(out_tokens: list[int], sentinels: list[int], end_span: int,
               end_doc: int | None) -> list[int]:
    """Original document from a :func:`cm3_transform` output; ValueError if malformed."""
    body = list(out_tokens)
    if end_doc is not None:
        if not body or body[-1] != end_doc:
            raise ValueError("malformed CM3 document: missing end_doc")
        body.pop()
    index = {s: i for i, s in enumerate(sentinels)}
    marks = [j for j, t in enumerate(body) if t in index]
    if not marks:
        if end_span in body:
            raise ValueError("malformed CM3 document: end_span without sentinels")
        return body
    k = len(marks) // 2
    if len(marks) % 2 or [body[j] for j in marks] != sentinels[:k] * 2:
        raise ValueError("malformed CM3 document: sentinels must appear as s0..s{k-1} twice")
    split = marks[k]
    head = body[:split]
    if end_span in head:
        raise ValueError("malformed CM3 document: end_span before the moved spans")
    bodies = _split_tail(body[split:], k, sentinels, end_span)
    doc: list[int] = []
    for t in head:
        doc.extend(bodies[index[t]] if t in index else [t])
    return doc
