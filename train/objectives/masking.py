"""Deterministic masking transforms for the masked objectives (text, regions, speech, patches).

Every function takes a ``torch.Generator`` and draws all of its randomness from it (never from
the global RNG), so a transform is a pure function of its arguments and the generator state.
Outputs live on the CPU; these run in data workers.

References and departures:

* :func:`mlm_mask` - BERT / UNITER MLM (80% ``[MASK]``, 10% random id, 10% unchanged).
  UNITER draws a Bernoulli(0.15) per token; here, as in BERT's ``create_pretraining_data``, the
  number of masked positions is fixed to ``max(1, round(prob * n_maskable))`` (less variance,
  same mean).  ``max_ngram > 1`` follows the ERNIE-Gram / ALBERT n-gram scheme (n ~ p(n) ∝ 1/n
  over 1..max_ngram, non-overlapping spans started at randomly ordered anchors), except that the
  last span is not shortened to fit the budget: spans are added until the budget is reached, so
  coverage may exceed it by at most ``max_ngram - 1`` units.  ``word_starts`` gives whole-word
  masking (BERT WWM); a word that contains an unmaskable position is never selected.
* :func:`region_mask` - UNITER MRM ``_get_img_mask``: independent Bernoulli per region, at least
  one region.
* :func:`span_mask` - fairseq ``compute_mask_indices`` (HuBERT / wav2vec 2.0, ``mask_type``
  static, overlaps allowed), parameterised by the per-frame start probability ``start_prob``
  (fairseq's ``mask_prob / mask_length``; 0.08 = 0.8 / 10).  Departure: starts are drawn from
  ``[0, n - span]`` inclusive, so the last frame can be masked (fairseq draws from
  ``[0, n - span)``).  For long inputs 0.08 with spans of 10 masks about 55-57% of the frames;
  the speech objective's default, wav2vec2's 0.065, about 50%.
* :func:`blockwise_mask` - BEiT ``MaskingGenerator`` (microsoft/unilm beit/masking_generator.py),
  with the target count ``round(ratio * rows * cols)``.
"""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = -100
"""Target value at positions that are not predicted (``torch.nn.CrossEntropyLoss`` default)."""

_REPLACE_MASK = 0.8
_REPLACE_RANDOM = 0.9  # cumulative: [0.8, 0.9) -> random id, [0.9, 1) -> unchanged


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------


def _uniform(gen: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    """One float uniform in [lo, hi) (any order of lo, hi) from ``gen``."""
    return lo + (hi - lo) * torch.rand((), generator=gen).item()


def _randint(gen: torch.Generator, lo: int, hi: int) -> int:
    """One int uniform in [lo, hi] (both ends included) from ``gen``."""
    return int(torch.randint(lo, hi + 1, (), generator=gen).item())


def _check_prob(name: str, value: float, *, allow_zero: bool) -> None:
    ok = (0.0 <= value <= 1.0) if allow_zero else (0.0 < value <= 1.0)
    if not ok:
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must be in {interval}, got {value}")


def _check_bool_vector(name: str, t: torch.Tensor | None, n: int) -> None:
    if t is None:
        return
    if t.dtype != torch.bool or t.dim() != 1 or t.numel() != n:
        raise ValueError(f"{name} must be a 1-D bool tensor of length {n}, "
                         f"got dtype {t.dtype} and shape {tuple(t.shape)}")


# ---------------------------------------------------------------------------------------------
# MLM
# ---------------------------------------------------------------------------------------------


def _units(n: int, maskable: torch.Tensor, word_starts: torch.Tensor | None) -> torch.Tensor:
    """Eligible masking units as a ``[U, 2]`` tensor of half-open position ranges, in order.

    Without ``word_starts`` a unit is one maskable position.  With it, a unit is a word (a start
    and the following non-start positions; position 0 always starts a word), eligible only when
    every position of the word is maskable.
    """
    if word_starts is None:
        pos = torch.nonzero(maskable).flatten()
        return torch.stack([pos, pos + 1], dim=1)
    starts_mask = word_starts.clone()
    starts_mask[0] = True
    starts = torch.nonzero(starts_mask).flatten()
    ends = torch.cat([starts[1:], torch.tensor([n])])
    word_id = torch.cumsum(starts_mask.long(), 0) - 1
    bad = torch.zeros(len(starts), dtype=torch.bool)
    bad[word_id[~maskable]] = True
    keep = ~bad
    return torch.stack([starts[keep], ends[keep]], dim=1)


def _ngram_weights(max_ngram: int) -> torch.Tensor:
    """p(n) ∝ 1/n for n in 1..max_ngram (ERNIE-Gram / ALBERT n-gram masking)."""
    w = 1.0 / torch.arange(1, max_ngram + 1, dtype=torch.float64)
    return w / w.sum()


def _select_units(units: torch.Tensor, target: int, gen: torch.Generator,
                  max_ngram: int) -> torch.Tensor:
    """Indices of the chosen units: random anchors, each extended to an n-gram of free units.

    Units are taken until at least ``target`` positions are covered.  An n-gram only extends over
    units that are adjacent in position space (no gap) and not yet chosen, so every chosen span is
    contiguous.
    """
    lengths = units[:, 1] - units[:, 0]
    order = torch.randperm(len(units), generator=gen)
    if max_ngram == 1:
        covered = torch.cumsum(lengths[order], 0)
        k = int(torch.searchsorted(covered, torch.tensor([target])).item())
        return order[: k + 1]
    sizes = torch.multinomial(_ngram_weights(max_ngram), len(units), replacement=True,
                              generator=gen) + 1
    starts, ends = units[:, 0].tolist(), units[:, 1].tolist()
    lens = lengths.tolist()
    taken = [False] * len(units)
    chosen: list[int] = []
    covered = 0
    for anchor, size in zip(order.tolist(), sizes.tolist()):
        if covered >= target:
            break
        if taken[anchor]:
            continue
        j = anchor
        while True:
            taken[j] = True
            chosen.append(j)
            covered += lens[j]
            nxt = j + 1
            if (nxt - anchor >= size or nxt >= len(units) or taken[nxt]
                    or starts[nxt] != ends[j]):
                break
            j = nxt
    return torch.tensor(chosen, dtype=torch.long)


def _positions(units: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask ``[n]`` of the positions covered by ``units`` (``[K, 2]`` ranges)."""
    delta = torch.zeros(n + 1, dtype=torch.long)
    delta.index_add_(0, units[:, 0], torch.ones(len(units), dtype=torch.long))
    delta.index_add_(0, units[:, 1], -torch.ones(len(units), dtype=torch.long))
    return torch.cumsum(delta[:n], 0) > 0


def _corrupt(ids: torch.Tensor, selected: torch.Tensor, gen: torch.Generator, mask_id: int,
             random_range: tuple[int, int]) -> torch.Tensor:
    """BERT 80/10/10 replacement of the selected positions, decided independently per position."""
    inputs = ids.clone()
    pos = torch.nonzero(selected).flatten()
    r = torch.rand(len(pos), generator=gen)
    rand_ids = torch.randint(random_range[0], random_range[1], (len(pos),), generator=gen,
                             dtype=ids.dtype)
    inputs[pos[r < _REPLACE_MASK]] = mask_id
    use_random = (r >= _REPLACE_MASK) & (r < _REPLACE_RANDOM)
    inputs[pos[use_random]] = rand_ids[use_random]
    return inputs


def _check_mlm_args(ids: torch.Tensor, random_range: tuple[int, int], prob: float,
                    maskable: torch.Tensor | None, max_ngram: int,
                    word_starts: torch.Tensor | None) -> None:
    if ids.dim() != 1 or ids.dtype != torch.long:
        raise ValueError(f"ids must be a 1-D int64 tensor, got dtype {ids.dtype} and shape "
                         f"{tuple(ids.shape)}")
    if len(random_range) != 2 or not random_range[0] < random_range[1]:
        raise ValueError(f"random_range must be (lo, hi) with lo < hi, got {random_range}")
    _check_prob("prob", prob, allow_zero=False)
    if not isinstance(max_ngram, int) or max_ngram < 1:
        raise ValueError(f"max_ngram must be an int >= 1, got {max_ngram}")
    _check_bool_vector("maskable", maskable, ids.numel())
    _check_bool_vector("word_starts", word_starts, ids.numel())


def mlm_mask(ids: torch.Tensor, gen: torch.Generator, *, mask_id: int,
             random_range: tuple[int, int], prob: float = 0.15,
             maskable: torch.Tensor | None = None, max_ngram: int = 1,
             word_starts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT / UNITER masked-LM corruption of one sequence.

    Args:
        ids: ``[n]`` int64 token ids.
        gen: source of all randomness.
        mask_id: id written at 80% of the selected positions.
        random_range: ``(lo, hi)``; 10% of the selected positions get an id uniform in [lo, hi).
        prob: fraction of the maskable positions to select (at least one is selected whenever
            some unit is eligible).
        maskable: ``[n]`` bool, False at positions that must never be selected (specials, pad).
        max_ngram: > 1 selects n-gram spans of units with p(n) ∝ 1/n (ERNIE-Gram).
        word_starts: ``[n]`` bool, True where a word starts: whole-word masking, and n-grams are
            counted in words.

    Returns:
        ``(inputs, targets)``, both ``[n]`` int64: the corrupted ids, and the original id at the
        selected positions with ``-100`` elsewhere.
    """
    _check_mlm_args(ids, random_range, prob, maskable, max_ngram, word_starts)
    n = ids.numel()
    targets = torch.full_like(ids, IGNORE_INDEX)
    if n == 0:
        return ids.clone(), targets
    if maskable is None:
        maskable = torch.ones(n, dtype=torch.bool)
    units = _units(n, maskable, word_starts)
    if len(units) == 0:
        return ids.clone(), targets
    n_cover = int((units[:, 1] - units[:, 0]).sum().item())
    target = max(1, round(prob * n_cover))
    chosen = _select_units(units, target, gen, max_ngram)
    selected = _positions(units[chosen], n)
    targets[selected] = ids[selected]
    return _corrupt(ids, selected, gen, mask_id, random_range), targets


# ---------------------------------------------------------------------------------------------
# regions (UNITER MRM)
# ---------------------------------------------------------------------------------------------


def region_mask(n: int, gen: torch.Generator, prob: float = 0.15) -> torch.Tensor:
    """``[n]`` bool: each region masked independently with ``prob``; at least one when n >= 1."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    _check_prob("prob", prob, allow_zero=False)
    mask = torch.rand(n, generator=gen) < prob
    if n > 0 and not bool(mask.any()):
        mask[_randint(gen, 0, n - 1)] = True
    return mask


# ---------------------------------------------------------------------------------------------
# speech frames (HuBERT / wav2vec 2.0)
# ---------------------------------------------------------------------------------------------


def span_mask(n: int, gen: torch.Generator, *, start_prob: float = 0.08, span: int = 10,
              min_spans: int = 1) -> torch.Tensor:
    """``[n]`` bool: static-length spans at random distinct starts, overlaps allowed (fairseq).

    The number of starts is ``max(min_spans, int(start_prob * n + u))`` with ``u ~ U[0, 1)``,
    capped at the ``n - span + 1`` available starts; starts are drawn without replacement from
    ``[0, n - span]``.  With the defaults (fairseq ``mask_prob=0.8``, ``mask_length=10``) about
    55-57% of the frames of a long input are masked.  If ``n <= span`` a single span masks the
    first ``n - 1`` frames (one frame stays visible; nothing is masked when ``n == 1``).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    _check_prob("start_prob", start_prob, allow_zero=True)
    if span < 1:
        raise ValueError(f"span must be >= 1, got {span}")
    if min_spans < 0:
        raise ValueError(f"min_spans must be >= 0, got {min_spans}")
    mask = torch.zeros(n, dtype=torch.bool)
    num = max(min_spans, int(start_prob * n + _uniform(gen)))
    if n == 0 or num == 0:
        return mask
    if n <= span:
        mask[: n - 1] = True
        return mask
    available = n - span + 1
    starts = torch.randperm(available, generator=gen)[: min(num, available)]
    idx = (starts[:, None] + torch.arange(span)[None, :]).flatten()
    mask[idx] = True
    return mask


# ---------------------------------------------------------------------------------------------
# image patches (BEiT)
# ---------------------------------------------------------------------------------------------


def _place_block(mask: torch.Tensor, gen: torch.Generator, min_block: int, max_area: int,
                 log_aspect: tuple[float, float]) -> int:
    """BEiT ``MaskingGenerator._mask``: up to 10 tries to add one block; newly masked count."""
    rows, cols = mask.shape
    for _ in range(10):
        area = _uniform(gen, min_block, max_area)
        aspect = math.exp(_uniform(gen, *log_aspect))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if w < cols and h < rows:
            top = _randint(gen, 0, rows - h)
            left = _randint(gen, 0, cols - w)
            block = mask[top: top + h, left: left + w]
            new = h * w - int(block.sum().item())
            if 0 < new <= max_area:
                block.fill_(True)
                return new
    return 0


def blockwise_mask(rows: int, cols: int, gen: torch.Generator, *, ratio: float = 0.4,
                   min_block: int = 4, max_block: int | None = None,
                   min_aspect: float = 0.3) -> torch.Tensor:
    """``[rows * cols]`` bool in raster order: BEiT blockwise masking of a patch grid.

    Blocks of area uniform in ``[min_block, min(max_block, remaining)]`` and aspect ratio
    log-uniform in ``[min_aspect, 1 / min_aspect]`` are placed at uniform positions until
    ``round(ratio * rows * cols)`` patches are masked (never more), or 10 tries in a row add
    nothing.
    """
    if rows < 1 or cols < 1:
        raise ValueError(f"rows and cols must be >= 1, got {rows}x{cols}")
    _check_prob("ratio", ratio, allow_zero=True)
    if min_block < 1:
        raise ValueError(f"min_block must be >= 1, got {min_block}")
    if max_block is not None and max_block < min_block:
        raise ValueError(f"max_block ({max_block}) must be >= min_block ({min_block})")
    if not 0.0 < min_aspect <= 1.0:
        raise ValueError(f"min_aspect must be in (0, 1], got {min_aspect}")
    target = round(ratio * rows * cols)
    cap = target if max_block is None else max_block
    log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    count = 0
    while count < target:
        added = _place_block(mask, gen, min_block, min(target - count, cap), log_aspect)
        if added == 0:
            break
        count += added
    return mask.flatten()
