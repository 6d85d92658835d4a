"""Masked image drawing (MaskGIT, Chang et al. 2022): the caption in context, a share of the
image's codes masked, the masked codes predicted all at once.

A sample is ``<cls> caption`` then the image's codes (2-D grid positions, the codes
entering as CM3's do) with a share r = cos(pi/2 * u), u ~ U(0, 1), of them replaced by
``<mask>`` (at least one): every ratio up to all codes masked, so the model learns to
draw from the caption alone as well as to complete a partly drawn image. With
probability ``objectives.maskgit_uncond`` the caption is left out (the unconditional model
that classifier-free guidance subtracts). The trunk runs bidirectionally; the loss is
cross-entropy of the masked codes through the vocabulary head.

Objects (patches with object pixels in ``seg.png``) can weigh more than the background
(``maskgit_object_weight``), and a share of samples (``maskgit_object_mask``) masks every
object code, or every object's box (``maskgit_object_mask_region=boxes``): the rest of the
image then says nothing of what the caption names.

An rq tokenizer's id stacks (``ctx.depth`` > 1, RQ-Transformer's layout, Lee et al.
2022): a position enters as the sum of its levels' token embeddings (``<mask>`` when
masked), and the head predicts its stack level by level, level k from the position's
hidden state plus a linear map of the embeddings of the levels before it (teacher-forced
in training, sampled in ``draw``); the loss is the stack's negative log-likelihood.

``draw`` decodes in ``steps`` rounds: each round predicts every masked code, samples them,
and keeps the most confident ones so that cos(pi/2 * (t+1)/steps) of the codes stay masked
(confidence = log-probability of the sampled code plus Gumbel noise annealed to 0), or,
with ``order="random"``, a uniformly random share (any-order sampling). Given codes can
stay as they are (infilling).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from omnimask.errors import OmnimaskError
from omnimask.fusion.packing import IGNORE, Segment, pack
from omnimask.model import init_linear

from ..evaluate import ORDERS
from .base import (
    Context,
    Objective,
    TokenPrediction,
    objective,
    pick_caption,
    stack_ids,
    text_segment,
)


def masked_image_segment(ctx: Context, codes: torch.Tensor, masked: torch.Tensor, cols: int,
                         targets: bool = True) -> Segment:
    """Codes [P * depth] as an image segment of vocabulary ids, ``<mask>`` where ``masked``
    [P] (bool); with ``targets``, the masked positions' codes are the targets. With
    ``ctx.depth`` > 1 the ids and targets are each stack's first level (the rest enters
    through ``image_stacks``)."""
    ids = (ctx.vocab.from_image(codes.long()) if ctx.depth == 1
           else stack_ids(ctx, codes)[:, 0])
    inp = ids.masked_fill(masked, ctx.sp("mask"))
    g = torch.arange(len(ids))
    rc = torch.stack([g // cols, g % cols], 1)
    tgt = ids.masked_fill(~masked, IGNORE) if targets else None
    return Segment("image", ids=inp, targets=tgt, rc=rc)


def image_stacks(p, stacks: torch.Tensor) -> torch.Tensor:
    """The ``stack`` input of packed samples that each end with an image of P positions:
    [T, depth] vocabulary ids, ``stacks`` [B, P, depth] at the images (-1 rows: masked
    positions and everything else)."""
    b, n, depth = stacks.shape
    out = torch.full((p.num_tokens, depth), -1, dtype=torch.long, device=stacks.device)
    pos = (p.cu_seqlens[1:].long().to(stacks.device)[:, None] - n
           + torch.arange(n, device=stacks.device)).reshape(-1)
    return out.index_copy(0, pos, stacks.reshape(-1, depth))


class MaskGITHead(TokenPrediction):
    """Cross-entropy of the masked codes through the vocabulary head, bidirectional (the
    batch's ``weights``: the object weight per target); id stacks: the summed cross-entropy
    of their levels, level k (>= 1) read from the hidden state plus ``levels[k - 1]`` of the
    normalised sum of the embeddings of the levels before it."""

    task, mask = "maskgit", "bidirectional"

    def __init__(self, model_cfg=None, cfg=None) -> None:
        super().__init__()
        depth = model_cfg.image_code_depth if model_cfg is not None else 1
        d = model_cfg.trunk.dim if model_cfg is not None else 1
        self.levels = nn.ModuleList(nn.Linear(d, d) for _ in range(depth - 1))
        init_linear(*self.levels)
        self.norm = nn.LayerNorm(d) if depth > 1 else None

    def level_logits(self, encoder, h: torch.Tensor, k: int, before: torch.Tensor | None,
                     rows: tuple[int, int]) -> torch.Tensor:
        """Logits [n, rows[1]] of level ``k`` at hidden states ``h`` [n, dim], ``before``
        [n, dim] the summed token embeddings of levels < k (None for k = 0), over the
        vocabulary rows ``rows`` = (first, count) of level k's codes."""
        x = h if k == 0 else h + self.levels[k - 1](self.norm(before))
        first, count = rows
        return encoder.vocab_logits(x, torch.arange(len(x), device=x.device))[
            :, first:first + count]

    def stack_nll(self, encoder, h: torch.Tensor, stacks: torch.Tensor,
                  image_rows: tuple[int, int]) -> torch.Tensor:
        """[n, depth] each level's negative log-likelihood in id stacks [n, depth]
        (vocabulary ids) at hidden states ``h`` [n, dim], given the true levels before it;
        ``image_rows``: (the image range's first row, codes per level)."""
        lo, size = image_rows
        ce, before = [], None
        for k in range(stacks.shape[1]):
            first = lo + k * size
            logits = self.level_logits(encoder, h, k, before, (first, size)).float()
            ce.append(F.cross_entropy(logits, stacks[:, k] - first, reduction="none"))
            e = encoder.trunk.tok(stacks[:, k])
            before = e if before is None else before + e
        return torch.stack(ce, 1)

    def forward(self, encoder, b: dict) -> dict:
        if "stack" not in b:
            return super().forward(encoder, b)
        p = b["packed"]
        pos = p.target_positions
        h = encoder(p, mask=self.mask, stack=b["stack"], outputs=pos)
        levels = self.stack_nll(encoder, h, b["stack_targets"].to(h.device), b["image_rows"])
        ce, w = levels.sum(1), b.get("weights")
        loss = ce.mean() if w is None else (ce * w.to(h.device)).sum() / w.to(h.device).sum()
        # each level's mean (unweighted): where a stack's uncertainty sits
        per = {f"{self.task}_level{k}": v.detach() for k, v in enumerate(levels.mean(0))}
        return {"loss": loss, self.task: loss.detach(), "tokens": p.num_tokens, **per}


def object_codes(corpus, i: int, setting: str) -> torch.Tensor:
    """[P] bool: sample ``i``'s codes whose patch holds object pixels (``regions``: class 0
    is the background); ``setting`` names what needs them in the error."""
    if corpus.regions is None:
        raise OmnimaskError(f"{setting}: the shards have no seg.png, so no object codes")
    return corpus.regions[i][:, 1:].float().sum(-1) > 0


def object_boxes(corpus, idx: list[int], margin: int = 1, setting: str = "infill=objects"
                 ) -> torch.Tensor:
    """[len(idx), P] bool: the codes within ``margin`` codes of the bounding box of each
    8-connected group of object codes (what ``eval generate``'s ``infill=objects`` draws:
    where each object is, not its outline); ``setting`` as ``object_codes``'s."""
    import numpy as np
    from scipy import ndimage

    rows, cols = corpus.grid
    out = torch.zeros(len(idx), rows * cols, dtype=torch.bool)
    for j, i in enumerate(idx):
        obj = object_codes(corpus, i, setting).view(rows, cols).numpy()
        box = np.zeros_like(obj)
        for r, c in ndimage.find_objects(ndimage.label(obj, structure=np.ones((3, 3)))[0]):
            box[max(0, r.start - margin):r.stop + margin,
                max(0, c.start - margin):c.stop + margin] = True
        out[j] = torch.from_numpy(box.reshape(-1))
    return out


@objective("maskgit")
class MaskGIT(Objective):
    head = MaskGITHead

    def sample(self, corpus, i: int, gen: torch.Generator) -> list[Segment]:
        codes = corpus.codes[i]
        n = len(codes) // self.ctx.depth
        ratio = math.cos(math.pi / 2 * float(torch.rand(1, generator=gen)))
        k = min(n, max(1, math.ceil(ratio * n)))
        masked = torch.zeros(n, dtype=torch.bool)
        masked[torch.randperm(n, generator=gen)[:k]] = True
        p = self.cfg.maskgit_object_mask
        if p > 0 and float(torch.rand(1, generator=gen)) < p:
            masked |= (object_boxes(corpus, [i], setting="objectives.maskgit_object_mask")[0]
                       if self.cfg.maskgit_object_mask_region == "boxes"
                       else object_codes(corpus, i, "objectives.maskgit_object_mask"))
        uncond = float(torch.rand(1, generator=gen)) < self.cfg.maskgit_uncond
        caption = [] if uncond else pick_caption(corpus, i, gen)
        return [text_segment(self.ctx, caption),
                masked_image_segment(self.ctx, codes, masked, corpus.grid[1])]

    def batch(self, corpus, idx, gen) -> dict:
        samples = [self.sample(corpus, i, gen) for i in idx]
        out = {"packed": pack(samples)}
        if self.ctx.depth > 1:  # the id stacks: known ones as inputs, masked ones as targets
            stacks = stack_ids(self.ctx, corpus.codes[idx])
            masked = torch.stack([s[-1].ids == self.ctx.sp("mask") for s in samples])
            out["stack"] = image_stacks(out["packed"], stacks.masked_fill(masked[..., None], -1))
            out["stack_targets"] = stacks[masked]
            lo = self.ctx.vocab.ranges()["image"][0]
            out["image_rows"] = (lo, self.ctx.level_size())
        w = self.cfg.maskgit_object_weight
        if w != 1.0:  # one weight per target, in the packed targets' order
            setting = "objectives.maskgit_object_weight"
            obj = [object_codes(corpus, i, setting)[s[-1].targets != IGNORE]
                   for i, s in zip(idx, samples)]
            out["weights"] = torch.cat(obj).float() * (w - 1) + 1
        return out


@torch.no_grad()
def draw(model, ctx: Context, captions: list[list[int]], num_codes: int, cols: int,
         steps: int = 12, temperature: float = 1.0, guidance: float = 1.0,
         gen: torch.Generator | None = None, start: torch.Tensor | None = None,
         keep_known: torch.Tensor | None = None, order: str = "confidence") -> torch.Tensor:
    """Codes [len(captions), num_codes * depth] drawn from the captions in ``steps`` rounds
    (``num_codes`` positions; depth: ``ctx.depth``, the model's ``image_code_depth``; each id
    stack drawn level by level, its confidence the stack's log-probability); ``guidance``
    s != 1 mixes in the caption-less prediction as u + s * (c - u). Infilling: ``start``
    [n, num_codes * depth] codes of which the positions where ``keep_known`` [n, num_codes]
    (bool) stay as given, the rest drawn on the same schedule over each image's masked
    count. ``order``: which sampled positions a round keeps, its most confident
    (``confidence``, MaskGIT's) or a uniformly ``random`` share."""
    model.eval()
    depth = ctx.depth
    if model.cfg.image_code_depth != depth:
        raise ValueError(f"draw: the model reads stacks of {model.cfg.image_code_depth} image "
                         f"codes, the context {depth}")
    lo, hi = ctx.vocab.ranges()["image"]
    n = len(captions)
    codes = torch.zeros(n, num_codes, depth, dtype=torch.long)
    known = torch.zeros(n, num_codes, dtype=torch.bool)
    if order not in ORDERS:
        raise ValueError(f"draw: order must be one of {', '.join(ORDERS)}, got {order!r}")
    if (start is None) != (keep_known is None):
        raise ValueError("draw: start and keep_known come together")
    if start is not None:
        if start.shape != (n, num_codes * depth) or keep_known.shape != (n, num_codes):
            raise ValueError(f"draw: start and keep_known must be [{n}, {num_codes * depth}] "
                             f"and [{n}, {num_codes}], got {list(start.shape)} and "
                             f"{list(keep_known.shape)}")
        known = keep_known.clone()
        codes = torch.where(known[..., None], start.long().view(n, num_codes, depth), codes)
    masked = (~known).sum(1, keepdim=True).double()  # [n, 1]: what the rounds draw
    guided = guidance != 1.0
    prompts = list(captions) + ([[]] * n if guided else [])
    dev = model.encoder.device
    # packed once, on the model's device; each round rewrites only the image ids, and
    # samples there (a GPU round then moves nothing to or from the host)
    p = pack([[text_segment(ctx, c), masked_image_segment(
        ctx, codes[k % n].reshape(-1), ~known[k % n], cols, targets=False)]
        for k, c in enumerate(prompts)])
    p = p.to(dev)
    pos = ((p.cu_seqlens[1:].long() - num_codes)[:, None]  # each sample ends with its image
           + torch.arange(num_codes, device=dev)).reshape(-1)
    codes, known, masked = codes.to(dev), known.to(dev), masked.to(dev)
    rng = gen if dev.type == "cpu" or gen is None else _device_generator(gen, dev)
    for t in range(steps):
        if depth == 1:
            ids = torch.where(known, codes[..., 0] + lo, ctx.sp("mask"))
            p.ids[pos] = (ids.repeat(2, 1) if guided else ids).reshape(-1)
            h = model.encoder(p, mask="bidirectional")
            logits = model.encoder.vocab_logits(h, pos).float()[:, lo:hi].log_softmax(-1)
            pick, conf = _sample(logits.view(len(prompts), num_codes, -1), n, guidance,
                                 temperature, rng)
            pick = pick[..., None]
        else:
            pick, conf = _sample_stacks(model, ctx, p, pos, codes, known, guidance,
                                        temperature, rng)
        if order == "random":  # each round unmasks a uniformly random share
            conf = torch.rand(conf.shape, generator=rng, device=dev)
        elif temperature > 0:  # MaskGIT's annealed noise: early rounds explore more
            u01 = torch.rand(conf.shape, generator=rng, device=dev).clamp(1e-9, 1)
            conf = conf + temperature * (1 - (t + 1) / steps) * -torch.log(-torch.log(u01))
        conf = conf.masked_fill(known, float("inf"))  # drawn codes stay
        still = (masked * math.cos(math.pi / 2 * (t + 1) / steps)).floor().long()
        rank = conf.argsort(-1, descending=True).argsort(-1)  # 0: the most confident
        new = (rank < num_codes - still) & ~known
        codes = torch.where(new[..., None], pick, codes)
        known |= new
    return codes.reshape(n, -1).cpu()


def _sample(logits: torch.Tensor, n: int, guidance: float, temperature: float,
            rng) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [n, P] sampled from log-probabilities [n (x2 guided), P, K] and their
    log-probabilities [n, P] (guided: u + s * (c - u), renormalised)."""
    if guidance != 1.0:
        c, u = logits[:n], logits[n:]
        logits = (u + guidance * (c - u)).log_softmax(-1)
    if temperature > 0:
        probs = (logits / temperature).softmax(-1)
        pick = torch.multinomial(probs.view(-1, probs.shape[-1]), 1, generator=rng)
        pick = pick.view(logits.shape[:2])
    else:
        pick = logits.argmax(-1)
    return pick, logits.gather(-1, pick[..., None])[..., 0]


def _sample_stacks(model, ctx: Context, p, pos: torch.Tensor, codes: torch.Tensor,
                   known: torch.Tensor, guidance: float, temperature: float, rng
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One round of ``draw`` over id stacks: (stacks [n, P, depth], their log-probability
    [n, P]), each level sampled given the levels drawn before it at the same position."""
    n, num, depth = codes.shape
    guided = guidance != 1.0
    stacks = stack_ids(ctx, codes.reshape(n, -1)).masked_fill(~known[..., None], -1)
    stacks = stacks.repeat(2, 1, 1) if guided else stacks
    p.ids[pos] = torch.where(stacks[..., 0] >= 0, stacks[..., 0], ctx.sp("mask")).reshape(-1)
    h = model.encoder(p, mask="bidirectional", stack=image_stacks(p, stacks), outputs=pos)
    head = model.heads["maskgit"]
    lo, size = ctx.vocab.ranges()["image"][0], ctx.level_size()
    picks, conf, before = [], 0.0, None
    for k in range(depth):
        first = lo + k * size
        logits = head.level_logits(model.encoder, h, k, before, (first, size)).float()
        pick, lp = _sample(logits.log_softmax(-1).view(len(stacks), num, size), n, guidance,
                           temperature, rng)
        picks.append(pick)
        conf = conf + lp
        e = model.encoder.trunk.tok(pick + first).reshape(n * num, -1)
        e = e.repeat(2, 1) if guided else e
        before = e if before is None else before + e
    return torch.stack(picks, -1), conf


def _device_generator(gen: torch.Generator, dev: torch.device) -> torch.Generator:
    """A generator on ``dev`` seeded from ``gen``: the same seed draws the same on one kind
    of device (CPU and GPU draws differ, as their random streams do)."""
    out = torch.Generator(device=dev)
    out.manual_seed(int(torch.randint(2 ** 62, (1,), generator=gen)))
    return out


@torch.no_grad()
def grounding(model, ctx: Context, corpus, idx: list[int]) -> dict[str, float]:
    """Whether drawing reads the caption: the loss of every code of images ``idx``, all
    masked (the first round of ``draw``), after the image's own caption and after another
    sample's (the list rotated by one); with ``seg.png``, also of the object codes alone.
    Equal pairs: the model draws the same whatever the caption says. Id stacks: their
    negative log-likelihood per code (the stack's over its depth)."""
    model.eval()
    depth, cols = ctx.depth, corpus.grid[1]
    n = corpus.codes.shape[1] // depth
    caps = [corpus.captions[i][0] if corpus.captions[i] else [] for i in idx]
    obj = (torch.stack([object_codes(corpus, i, "") for i in idx])
           if corpus.regions is not None else None)
    lo = ctx.vocab.ranges()["image"][0]
    out = {}
    for name, cs in (("caption", caps), ("other_caption", caps[1:] + caps[:1])):
        p = pack([[text_segment(ctx, c), masked_image_segment(
            ctx, corpus.codes[i], torch.ones(n, dtype=torch.bool), cols)]
            for c, i in zip(cs, idx)])
        h = model.encoder(p, mask="bidirectional")
        pos = p.target_positions.to(h.device)
        if depth == 1:
            ce = F.cross_entropy(model.encoder.vocab_logits(h, pos).float(),
                                 p.targets.to(h.device)[pos], reduction="none").cpu()
        else:
            stacks = stack_ids(ctx, corpus.codes[idx]).reshape(-1, depth)
            ce = model.heads["maskgit"].stack_nll(model.encoder, h[pos], stacks.to(h.device),
                                                  (lo, ctx.level_size())).mean(1).cpu()
        out[f"codes_given_{name}"] = round(float(ce.mean()), 4)
        if obj is not None:
            out[f"object_codes_given_{name}"] = round(float(ce[obj.flatten()].mean()), 4)
    return out
