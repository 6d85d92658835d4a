"""Image-text contrastive learning (CLIP/ALBEF ITC) with the shared trunk as both encoders.

Captions (``<cls>`` + text) and images (``<cls>`` + patch features) are packed as separate
samples of one batch, so the trunk encodes each alone; each sample's output states are
mean-pooled (at initialisation the ``<cls>`` states barely differ between samples and
contrastive training collapsed them in our tests; the mean keeps the inputs' spread),
projected and l2-normalised; symmetric InfoNCE with a learnable temperature
(initialised at 0.07, logit scale clamped at 100). Under DDP the embeddings of every
rank are gathered with gradients, so each rank sees the global batch as negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omnimask.fusion.packing import Segment, pack
from omnimask.train.distributed import group_rank_and_world

from .base import OBJECTIVES, Context, image_segment, pick_caption, text_segment


def embed_pairs(model, ctx: Context, corpus, idx, caps, with_tokens: bool = False):
    """l2-normalised text and image embeddings [B, itc_dim] each (+ packed positions)."""
    cls = torch.tensor([ctx.sp("cls")])
    samples = [[text_segment(ctx, c)] for c in caps]
    samples += [[Segment("text", ids=cls), image_segment(corpus, i)] for i in idx]
    p = pack(samples)
    t, v = pooled_embeddings(model, p, len(caps))
    return (t, v, p.num_tokens) if with_tokens else (t, v)


def pooled_embeddings(model, p, n_text: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pooled states of each packed sample through the ITC projections, l2-normalised:
    the first ``n_text`` samples are texts, the rest images."""
    h = model.encode(p)
    sample = p.sample_index().to(h.device)
    pooled = torch.zeros(p.num_samples, h.shape[1], device=h.device, dtype=h.dtype)
    pooled = pooled.index_add(0, sample, h) / torch.bincount(sample)[:, None].to(h.dtype)
    text = model.itc_norm["text"](pooled[:n_text])
    image = model.itc_norm["image"](pooled[n_text:])
    return (F.normalize(model.itc_text(text), dim=-1),
            F.normalize(model.itc_image(image), dim=-1))


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    rank, size = group_rank_and_world()
    if size == 1:
        return x
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x))


def info_nce(t: torch.Tensor, v: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE; rows of this rank's block are its positives."""
    rank, _ = group_rank_and_world()
    tt, vv = gather_with_grad(t), gather_with_grad(v)
    scale = logit_scale.exp().clamp(max=100.0)
    labels = torch.arange(len(t), device=t.device) + rank * len(t)
    return (F.cross_entropy(scale * t @ vv.T, labels)
            + F.cross_entropy(scale * v @ tt.T, labels)) / 2


@OBJECTIVES.register("itc")
class ITC:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def batch(self, corpus, idx, gen) -> dict:
        return {"corpus": corpus, "idx": list(idx),
                "caps": [pick_caption(corpus, i, gen) for i in idx]}

    def loss(self, model, b) -> dict:
        t, v, tokens = embed_pairs(model, self.ctx, b["corpus"], b["idx"], b["caps"], True)
        loss = info_nce(t.float(), v.float(), model.logit_scale)
        with torch.no_grad():
            acc = ((t @ v.T).argmax(-1) == torch.arange(len(t), device=t.device)).float().mean()
        return {"loss": loss, "itc": loss.detach(), "itc_acc": acc,
                "temperature": 1 / model.logit_scale.detach().exp(), "tokens": tokens}
