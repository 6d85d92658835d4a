"""Padding-free packing of multimodal samples (the trunk's input format).

A sample is a list of :class:`Segment` (a caption, an image's VQ codes, patch features or
pixels, a spoken caption's units or frames). :func:`pack` concatenates every segment of every
sample into one sequence of ``T`` positions and describes it with flat tensors; ``cu_seqlens``
marks where each sample starts, so attention never crosses samples. Everything here is a
pure function of its inputs.

Continuous inputs sit at ``feature_index[m]``: either feature rows (``features[m]``, one per
position) or raw inputs (``pixels[m]``: one uint8 image per segment, which the model's
encoder turns into that segment's ``grid`` tokens in raster order). One modality of one
batch is given one way, never both, so ``feature_index[m]`` always lines up with one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from omnimask.modalities.vocab import MODALITIES

IGNORE = -100  # target of a position that is not predicted


@dataclass
class Segment:
    modality: str  # "text" | "image" | "speech"
    ids: torch.Tensor | None = None  # [n] token ids (in the shared vocabulary)
    features: torch.Tensor | None = None  # [n, d] continuous inputs (patches, frames)
    grid: tuple[int, int] | None = None  # (rows, cols) for 2-D positions; rows * cols == n
    targets: torch.Tensor | None = None  # [n] ids to predict, IGNORE elsewhere
    rc: torch.Tensor | None = None  # [n, 2] explicit (row, col), -1 off-grid (CM3 reorders)
    # [3, H, W] uint8: an image the model's encoder turns into grid[0] * grid[1] tokens
    pixels: torch.Tensor | None = None
    token_type: int = 0  # BERT's segment id (sentence A = 0, B = 1) for imported models

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"unknown modality {self.modality!r}; known: {', '.join(MODALITIES)}")
        if sum(x is not None for x in (self.ids, self.features, self.pixels)) != 1:
            raise ValueError("a segment has either ids or features (or pixels): exactly one")
        if self.pixels is not None:
            if self.grid is None:
                raise ValueError("a pixels segment needs its token grid (rows, cols)")
            if self.pixels.dtype != torch.uint8 or self.pixels.ndim != 3:
                raise ValueError(f"pixels must be uint8 [3, H, W], got {self.pixels.dtype} "
                                 f"{tuple(self.pixels.shape)}")
        n = len(self)
        if n == 0:
            raise ValueError(f"empty {self.modality} segment")
        if self.features is not None and self.features.ndim != 2:
            raise ValueError(f"features must be [n, d], got {tuple(self.features.shape)}")
        if self.grid is not None and self.grid[0] * self.grid[1] != n:
            raise ValueError(f"grid {self.grid} does not hold {n} positions")
        if self.rc is not None and (self.grid is not None or self.rc.shape != (n, 2)):
            raise ValueError(f"rc must be [{n}, 2] and exclusive with grid")
        if self.targets is not None and self.targets.shape != (n,):
            raise ValueError(f"targets must be [{n}], got {tuple(self.targets.shape)}")

    def __len__(self) -> int:
        if self.pixels is not None:
            return self.grid[0] * self.grid[1]
        return len(self.ids) if self.ids is not None else self.features.shape[0]


@dataclass
class PackedBatch:
    ids: torch.Tensor  # [T] long; -1 where the input is a feature vector
    modality: torch.Tensor  # [T] long, index into MODALITIES
    segment: torch.Tensor  # [T] long, segment number within its sample
    position: torch.Tensor  # [T] long, index within its segment
    position_2d: torch.Tensor  # [T, 2] long (row, col) on grids, (-1, -1) elsewhere
    targets: torch.Tensor  # [T] long, IGNORE where nothing is predicted
    cu_seqlens: torch.Tensor  # [B + 1] int32, sample boundaries
    max_seqlen: int
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # modality -> [n_m, d_m]
    feature_index: dict[str, torch.Tensor] = field(default_factory=dict)  # modality -> [n_m]
    # modality -> [k_m, 3, H, W] uint8, one per segment given as pixels; their tokens (n_m /
    # k_m each, raster order) fill feature_index[m] in the same order
    pixels: dict[str, torch.Tensor] = field(default_factory=dict)
    token_type: torch.Tensor | None = None  # [T] long, BERT token types; None: all 0

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[0])

    @property
    def num_samples(self) -> int:
        return int(self.cu_seqlens.shape[0]) - 1

    @property
    def target_positions(self) -> torch.Tensor:
        return (self.targets != IGNORE).nonzero(as_tuple=True)[0]

    def sample_index(self) -> torch.Tensor:
        return sample_index(self.cu_seqlens)

    def to(self, device) -> PackedBatch:
        """The same batch with every tensor on ``device`` (``cu_seqlens`` included)."""
        mv = {k: getattr(self, k).to(device) for k in (
            "ids", "modality", "segment", "position", "position_2d", "targets", "cu_seqlens")}
        return PackedBatch(**mv, max_seqlen=self.max_seqlen,
                           features={m: v.to(device) for m, v in self.features.items()},
                           feature_index={m: v.to(device) for m, v in self.feature_index.items()},
                           pixels={m: v.to(device) for m, v in self.pixels.items()},
                           token_type=None if self.token_type is None
                           else self.token_type.to(device))


def pack(samples: list[list[Segment]]) -> PackedBatch:
    """Concatenate every segment of every sample, in order, with no padding."""
    if not samples or any(not s for s in samples):
        raise ValueError("pack needs at least one sample and every sample a segment")
    ids, mod, seg, pos, pos2, tgt, lens, types = [], [], [], [], [], [], [], []
    feats: dict[str, list[torch.Tensor]] = {}
    pix: dict[str, list[torch.Tensor]] = {}
    fidx: dict[str, list[torch.Tensor]] = {}
    offset = 0
    for sample in samples:
        length = 0
        for k, s in enumerate(sample):
            n = len(s)
            ar = torch.arange(n)
            if s.ids is not None:
                ids.append(s.ids.long())
            else:
                ids.append(torch.full((n,), -1, dtype=torch.long))
                raw = s.pixels is not None
                if s.modality in (feats if raw else pix):
                    raise ValueError(f"{s.modality} segments given both as features and as "
                                     "pixels in one batch; use one input form per modality")
                (pix if raw else feats).setdefault(s.modality, []).append(
                    s.pixels if raw else s.features)
                fidx.setdefault(s.modality, []).append(ar + offset + length)
            mod.append(torch.full((n,), MODALITIES.index(s.modality), dtype=torch.long))
            seg.append(torch.full((n,), k, dtype=torch.long))
            types.append(torch.full((n,), s.token_type, dtype=torch.long))
            pos.append(ar)
            if s.rc is not None:
                pos2.append(s.rc.long())
            elif s.grid is not None:
                pos2.append(torch.stack([ar // s.grid[1], ar % s.grid[1]], 1))
            else:
                pos2.append(torch.full((n, 2), -1, dtype=torch.long))
            tgt.append(s.targets.long() if s.targets is not None
                       else torch.full((n,), IGNORE, dtype=torch.long))
            length += n
        lens.append(length)
        offset += length
    for m, v in pix.items():
        if len({tuple(x.shape) for x in v}) > 1:
            raise ValueError(f"{m} pixels of one batch differ in size: "
                             f"{sorted({tuple(x.shape) for x in v})}")
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return PackedBatch(
        ids=torch.cat(ids), modality=torch.cat(mod), segment=torch.cat(seg),
        position=torch.cat(pos), position_2d=torch.cat(pos2), targets=torch.cat(tgt),
        cu_seqlens=cu, max_seqlen=max(lens),
        features={m: torch.cat(v) for m, v in feats.items()},
        feature_index={m: torch.cat(v) for m, v in fidx.items()},
        pixels={m: torch.stack(v) for m, v in pix.items()},
        token_type=torch.cat(types) if any(s.token_type for x in samples for s in x) else None)


def sample_index(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[T] index of the sample each packed position belongs to."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(lens), device=lens.device), lens)


def group_slots(group: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each element's rank among the elements of its group (groups 0..n-1, in any order;
    ties kept in order) and each group's size [n]."""
    order = torch.argsort(group, stable=True)
    counts = torch.bincount(group, minlength=n)
    slot = torch.empty_like(group)
    slot[order] = (torch.arange(len(group), device=group.device)
                   - (counts.cumsum(0) - counts)[group[order]])
    return slot, counts


def unpack(x: torch.Tensor, cu_seqlens: torch.Tensor) -> list[torch.Tensor]:
    """Split a packed [T, ...] tensor back into per-sample tensors."""
    if x.shape[0] != int(cu_seqlens[-1]):
        raise ValueError(f"tensor has {x.shape[0]} positions, cu_seqlens says {int(cu_seqlens[-1])}")
    return list(torch.split(x, (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()))


def pack_to_budget(lengths: list[int], budget: int) -> list[list[int]]:
    """Group sample indices into bins of at most ``budget`` tokens (first-fit decreasing),
    for static shapes: every bin then packs to at most ``budget`` positions."""
    too_long = [i for i, n in enumerate(lengths) if n > budget]
    if too_long:
        raise ValueError(f"samples {too_long[:5]} are longer than the budget of {budget} tokens")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        j = next((b for b, r in enumerate(room) if r >= lengths[i]), None)
        if j is None:
            bins.append([i])
            room.append(budget - lengths[i])
        else:
            bins[j].append(i)
            room[j] -= lengths[i]
    return [sorted(b) for b in bins]


def from_padded(input_ids, attention_mask=None, token_type_ids=None,
                modality: str = "text") -> PackedBatch:
    """Hugging Face-style right-padded inputs ``[B, L]`` (``input_ids``, ``attention_mask``,
    ``token_type_ids``) as a PackedBatch of each row's real tokens, positions counted from
    0 as BERT counts them. ``to_padded`` turns the trunk's outputs back into ``[B, L, ...]``."""
    ids = torch.as_tensor(input_ids).long()
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(ids.shape)}")
    att = (torch.ones_like(ids, dtype=torch.bool) if attention_mask is None
           else torch.as_tensor(attention_mask, device=ids.device).bool())
    if att.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(att.shape)}, input_ids "
                         f"{tuple(ids.shape)}")
    lens = att.sum(1)
    ar = torch.arange(ids.shape[1], device=ids.device)
    bad = ((att != (ar[None] < lens[:, None])).any(1) | (lens == 0)).nonzero()[:, 0]
    if bad.numel():
        raise ValueError(f"attention_mask row {int(bad[0])} is not right-padded (ones, then "
                         "zeros, at least one one): BERT-style inputs pad on the right")
    types = None
    if token_type_ids is not None:
        tt = torch.as_tensor(token_type_ids, device=ids.device).long()
        if tt.shape != ids.shape:
            raise ValueError(f"token_type_ids has shape {tuple(tt.shape)}, input_ids "
                             f"{tuple(ids.shape)}")
        types = tt[att]
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32, device=ids.device)
    cu[1:] = lens.cumsum(0)
    T = int(cu[-1])
    pos = ar[None].expand_as(ids)[att]
    return PackedBatch(
        ids=ids[att], modality=torch.full((T,), MODALITIES.index(modality), dtype=torch.long,
                                          device=ids.device),
        segment=torch.zeros(T, dtype=torch.long, device=ids.device), position=pos,
        position_2d=torch.full((T, 2), -1, dtype=torch.long, device=ids.device),
        targets=torch.full((T,), IGNORE, dtype=torch.long, device=ids.device), cu_seqlens=cu,
        max_seqlen=int(lens.max()), token_type=types)


def to_padded(x: torch.Tensor, cu_seqlens: torch.Tensor, length: int | None = None,
              value: float = 0.0) -> torch.Tensor:
    """Packed ``[T, ...]`` -> ``[B, length, ...]`` (``value`` at padded positions; length
    defaults to the longest sample)."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long().to(x.device)
    L = int(lens.max()) if length is None else length
    if lens.numel() and int(lens.max()) > L:
        raise ValueError(f"a sample of {int(lens.max())} positions does not fit length {L}")
    out = x.new_full((len(lens), L, *x.shape[1:]), value)
    out[torch.arange(L, device=x.device)[None] < lens[:, None]] = x
    return out
