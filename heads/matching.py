"""Image-text matching pieces shared by the pretraining ITC and ITM heads
(``train/objectives/itc.py``, ``uniter.py``) and the retrieval head (``retrieval.py``):
mean pooling of packed samples, symmetric InfoNCE and ITM's input features. They live
here, below ``train/``, so that task heads reuse them without importing training code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omnimask.modalities.vocab import MODALITIES


def _rank_and_world() -> tuple[int, int]:
    """(rank, size) of the initialised process group, (0, 1) without one (as
    ``train.distributed.group_rank_and_world``, which heads must not import)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gathers() -> bool:
    """Training with several ranks: batches are gathered. Evaluation (no grad) stays on
    each rank's own batch, so rank 0 may evaluate alone and scores match one process."""
    return _rank_and_world()[1] > 1 and torch.is_grad_enabled()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` of every rank concatenated, gradients flowing back to each (one rank, or no
    grad: ``x``)."""
    if not _gathers():
        return x
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x))


def info_nce(t: torch.Tensor, v: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of l2-normalised ``t`` [B, d] and ``v`` [B, d]: row k of each is the
    other's positive; training under DDP every rank's rows are negatives too (rank r's positives
    sit in its block of the gathered rows). Temperature ``1 / exp(logit_scale)``, the
    scale clamped at 100 (CLIP)."""
    rank = _rank_and_world()[0] if _gathers() else 0
    tt, vv = gather_with_grad(t), gather_with_grad(v)
    scale = logit_scale.exp().clamp(max=100.0)
    labels = torch.arange(len(t), device=t.device) + rank * len(t)
    return (F.cross_entropy(scale * t @ vv.T, labels)
            + F.cross_entropy(scale * v @ tt.T, labels)) / 2


def position_means(h: torch.Tensor, p, select: torch.Tensor | None = None,
                   skip_first: bool = False) -> torch.Tensor:
    """[B, dim] mean of each packed sample's hidden states ``h`` [T, dim] at the positions
    ``select`` [T] bool marks (all when None), without the sample's first position (its
    ``<cls>``) when ``skip_first``; zeros for a sample without any."""
    sel = (torch.ones(h.shape[0], dtype=torch.bool, device=h.device) if select is None
           else select.to(h.device).clone())
    if skip_first:
        sel[p.cu_seqlens[:-1].long().to(h.device)] = False
    idx = p.sample_index().to(h.device)[sel]
    b = len(p.cu_seqlens) - 1
    total = h.new_zeros(b, h.shape[1]).index_add_(0, idx, h[sel])
    count = torch.bincount(idx, minlength=b).clamp(min=1).to(h.dtype)
    return total / count[:, None]


def pair_features(encoder, h: torch.Tensor, p, features: str = "cls") -> torch.Tensor:
    """ITM's input for packed pairs (a query, text or speech, then an image): "cls" is
    UNITER's pooled ``<cls>`` [B, dim]; "pair" adds ``u * v`` and ``|u - v|`` with u, v the
    mean fused query and image states (InferSent's matching features) [B, 3 dim]."""
    x = encoder.pooled(h, p)
    if features == "pair":
        image = p.modality.to(h.device) == MODALITIES.index("image")
        u = position_means(h, p, ~image, skip_first=True)
        v = position_means(h, p, image)
        x = torch.cat([x, u * v, (u - v).abs()], -1)
    return x
