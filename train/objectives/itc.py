"""Image-text contrastive learning (CLIP/ALBEF ITC) with the shared trunk as both encoders.

Captions (``<cls>`` + text) and images (``<cls>`` + patch features) are packed as separate
samples of one batch, so the trunk encodes each alone; each sample's output states are
mean-pooled (at initialisation the ``<cls>`` states barely differ between samples; the
mean keeps the inputs' spread),
projected and l2-normalised; symmetric InfoNCE with a learnable temperature
(initialised at 0.07, logit scale clamped at 100). Under DDP the embeddings of every
rank are gathered with gradients, so each rank sees the global batch as negatives.

The head (``model.heads.itc``): optional BatchNorm (``model.itc_batchnorm``), the two
projections without bias (as CLIP: a bias lets both towers collapse onto one direction)
and the learnable logit scale.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from omnimask.fusion.packing import Segment, pack
from omnimask.heads.matching import info_nce, position_means
from omnimask.model import init_linear

from .base import Context, Objective, image_segment, objective, pick_caption, text_segment


def pair_batch(ctx: Context, corpus, idx, caps) -> dict:
    """Captions and images packed as separate samples: the texts first, then the images."""
    cls = torch.tensor([ctx.sp("cls")])
    samples = [[text_segment(ctx, c)] for c in caps]
    samples += [[Segment("text", ids=cls), image_segment(corpus, i, ctx.pixels)] for i in idx]
    return {"packed": pack(samples), "n_text": len(caps)}


def embed_pairs(model, ctx: Context, corpus, idx, caps, with_tokens: bool = False):
    """l2-normalised text and image embeddings [B, itc_dim] each (+ packed positions)."""
    b = pair_batch(ctx, corpus, idx, caps)
    t, v = model.heads["itc"].embed(model.encoder, b["packed"], b["n_text"])
    return (t, v, b["packed"].num_tokens) if with_tokens else (t, v)


class ITCHead(nn.Module):
    def __init__(self, model_cfg, cfg=None) -> None:
        super().__init__()
        d = model_cfg.trunk.dim
        self.norm = nn.ModuleDict({m: nn.BatchNorm1d(d, affine=False) if model_cfg.itc_batchnorm
                                   else nn.Identity() for m in ("text", "image")})
        self.text = nn.Linear(d, model_cfg.itc_dim, bias=False)
        self.image = nn.Linear(d, model_cfg.itc_dim, bias=False)
        init_linear(self.text, self.image)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / model_cfg.itc_temperature)))

    def embed(self, encoder, p, n_text: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean-pooled states of each packed sample through the projections, l2-normalised:
        the first ``n_text`` samples are texts, the rest images."""
        pooled = position_means(encoder(p), p)
        text = self.norm["text"](pooled[:n_text])
        image = self.norm["image"](pooled[n_text:])
        return (F.normalize(self.text(text), dim=-1), F.normalize(self.image(image), dim=-1))

    def forward(self, encoder, b: dict) -> dict:
        t, v = self.embed(encoder, b["packed"], b["n_text"])
        loss = info_nce(t.float(), v.float(), self.logit_scale)
        with torch.no_grad():
            acc = ((t @ v.T).argmax(-1) == torch.arange(len(t), device=t.device)).float().mean()
        return {"loss": loss, "itc": loss.detach(), "itc_acc": acc,
                "temperature": 1 / self.logit_scale.detach().exp(),
                "tokens": b["packed"].num_tokens}


@objective("itc")
class ITC(Objective):
    head = ITCHead

    def batch(self, corpus, idx, gen) -> dict:
        idx = list(idx)
        caps = [pick_caption(corpus, i, gen) for i in idx]
        return {**pair_batch(self.ctx, corpus, idx, caps), "idx": idx, "caps": caps}
