"""Masked image drawing (MaskGIT, Chang et al. 2022): the caption in context, a share of the
image's codes masked, the masked codes predicted all at once.

A sample is ``<cls> caption`` then the image's codes (2-D grid positions, the codes
entering as CM3's do) with a share r = cos(pi/2 * u), u ~ U(0, 1), of them replaced by
``<mask>`` (at least one): every ratio up to all codes masked, so the model learns to
draw from the caption alone as well as to complete a partly drawn image. With
probability ``objectives.maskgit_uncond`` the caption is left out (the unconditional model
that classifier-free guidance subtracts). The trunk runs bidirectionally; the loss is
cross-entropy of the masked codes through the vocabulary head.

``draw`` decodes in ``steps`` rounds: each round predicts every masked code, samples them,
and keeps the most confident ones so that cos(pi/2 * (t+1)/steps) of the codes stay masked
(confidence = log-probability of the sampled code plus Gumbel noise annealed to 0).
"""

from __future__ import annotations

import math

import torch

from omnimask.fusion.packing import IGNORE, Segment, pack

from .base import Context, Objective, TokenPrediction, objective, pick_caption, text_segment


def masked_image_segment(ctx: Context, codes: torch.Tensor, masked: torch.Tensor, cols: int,
                         targets: bool = True) -> Segment:
    """Codes [P] as an image segment of vocabulary ids, ``<mask>`` where ``masked`` [P]
    (bool); with ``targets``, the masked positions' codes are the targets."""
    ids = ctx.vocab.from_image(codes.long())
    inp = ids.masked_fill(masked, ctx.sp("mask"))
    g = torch.arange(len(codes))
    rc = torch.stack([g // cols, g % cols], 1)
    tgt = ids.masked_fill(~masked, IGNORE) if targets else None
    return Segment("image", ids=inp, targets=tgt, rc=rc)


class MaskGITHead(TokenPrediction):
    """Cross-entropy of the masked codes through the vocabulary head, bidirectional."""

    task, mask = "maskgit", "bidirectional"


@objective("maskgit")
class MaskGIT(Objective):
    head = MaskGITHead

    def sample(self, corpus, i: int, gen: torch.Generator) -> list[Segment]:
        codes = corpus.codes[i]
        n = len(codes)
        ratio = math.cos(math.pi / 2 * float(torch.rand(1, generator=gen)))
        k = min(n, max(1, math.ceil(ratio * n)))
        masked = torch.zeros(n, dtype=torch.bool)
        masked[torch.randperm(n, generator=gen)[:k]] = True
        uncond = float(torch.rand(1, generator=gen)) < self.cfg.maskgit_uncond
        caption = [] if uncond else pick_caption(corpus, i, gen)
        return [text_segment(self.ctx, caption),
                masked_image_segment(self.ctx, codes, masked, corpus.grid[1])]

    def batch(self, corpus, idx, gen) -> dict:
        return {"packed": pack([self.sample(corpus, i, gen) for i in idx])}


@torch.no_grad()
def draw(model, ctx: Context, captions: list[list[int]], num_codes: int, cols: int,
         steps: int = 12, temperature: float = 1.0, guidance: float = 1.0,
         gen: torch.Generator | None = None) -> torch.Tensor:
    """Codes [len(captions), num_codes] drawn from the captions in ``steps`` rounds;
    ``guidance`` s != 1 mixes in the caption-less prediction as u + s * (c - u)."""
    model.eval()
    lo, hi = ctx.vocab.ranges()["image"]
    n = len(captions)
    codes = torch.zeros(n, num_codes, dtype=torch.long)
    known = torch.zeros(n, num_codes, dtype=torch.bool)
    guided = guidance != 1.0
    for t in range(steps):
        prompts = list(captions) + ([[]] * n if guided else [])
        samples = [[text_segment(ctx, c), masked_image_segment(
            ctx, codes[k % n], ~known[k % n], cols, targets=False)] for k, c in enumerate(prompts)]
        p = pack(samples)
        h = model.encoder(p, mask="bidirectional")
        starts = p.cu_seqlens[1:].long() - num_codes  # each sample ends with its image
        pos = (starts[:, None] + torch.arange(num_codes)).reshape(-1).to(h.device)
        logits = model.encoder.vocab_logits(h, pos).float()[:, lo:hi].log_softmax(-1).cpu()
        logits = logits.view(len(samples), num_codes, -1)
        if guided:
            c, u = logits[:n], logits[n:]
            logits = (u + guidance * (c - u)).log_softmax(-1)
        if temperature > 0:
            probs = (logits / temperature).softmax(-1)
            pick = torch.multinomial(probs.view(-1, probs.shape[-1]), 1, generator=gen)
            pick = pick.view(n, num_codes)
        else:
            pick = logits.argmax(-1)
        conf = logits.gather(-1, pick[..., None])[..., 0]
        if temperature > 0:  # MaskGIT's annealed noise: early rounds explore more
            g = -torch.log(-torch.log(torch.rand(conf.shape, generator=gen).clamp(1e-9, 1)))
            conf = conf + temperature * (1 - (t + 1) / steps) * g
        conf = conf.masked_fill(known, float("inf"))  # drawn codes stay
        still = math.floor(num_codes * math.cos(math.pi / 2 * (t + 1) / steps))
        keep = num_codes - still
        order = conf.argsort(-1, descending=True)[:, :keep]
        new = torch.zeros_like(known).scatter_(1, order, True) & ~known
        codes = torch.where(new, pick, codes)
        known |= new
    return codes
