"""UNITER's objectives with conditional masking (one modality masked per example).

- ``mlm``: caption tokens masked (15%, 80/10/10, at least one; optional n-gram or
  whole-word units), the image intact; cross-entropy at masked tokens.
- ``mrfr``: image patches masked (p=0.15 each, at least one: the projected feature replaced
  by a learned mask embedding), the caption intact; regress the original feature (MSE).
- ``mrc``: same masking; KL(target || model) against a soft target. UNITER's target is
  the detector's class distribution; ours is the VQ tokenizer's code distribution,
  ``softmax(cos(latent, codes) / t)``.
- ``mim``: BEiT: blockwise-masked patches (~40%) predict their VQ code ids through the
  vocabulary head.
- ``itm``: with p=0.5 the image is replaced by another one (random or, as an option,
  sampled by ITC similarity); Linear(H, 2) on the pooled ``<cls>``; plus word-region
  alignment by optimal transport (IPOT) with weight 0.1 on the signed OT distance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omnimask.fusion.packing import pack

from .base import (
    OBJECTIVES,
    Context,
    image_segment,
    masked_by_modality,
    pick_caption,
    text_segment,
)
from .masking import blockwise_mask, mlm_mask, region_mask
from .ot import wra_loss


class _Base:
    def __init__(self, ctx: Context) -> None:
        self.ctx, self.cfg = ctx, ctx.cfg


@OBJECTIVES.register("mlm")
class MLM(_Base):
    def batch(self, corpus, idx, gen) -> dict:
        c, samples = self.ctx, []
        lo, hi = c.vocab.ranges()["text"]
        for i in idx:
            ids = torch.tensor(pick_caption(corpus, i, gen))
            inp, tgt = mlm_mask(ids, gen, mask_id=c.sp("mask"), random_range=(lo, hi),
                                prob=self.cfg.mlm_prob, max_ngram=self.cfg.mlm_max_ngram,
                                word_starts=c.word_start[ids] if self.cfg.mlm_whole_word
                                else None)
            samples.append([text_segment(c, inp, tgt), image_segment(corpus, i)])
        return {"packed": pack(samples)}

    def loss(self, model, b) -> dict:
        p = b["packed"]
        h = model.encode(p)
        pos = p.target_positions
        loss = F.cross_entropy(model.vocab_logits(h, pos).float(), p.targets[pos])
        return {"loss": loss, "mlm": loss.detach(), "tokens": p.num_tokens}


class _MaskedRegions(_Base):
    """Caption intact, image patches masked: shared by MRFR and MRC."""

    def _masks(self, corpus, gen) -> torch.Tensor:
        r, c = corpus.grid
        return region_mask(r * c, gen, self.cfg.mrm_prob)

    def batch(self, corpus, idx, gen) -> dict:
        samples, masks, rows = [], {"image": []}, list(idx)
        for i in rows:
            samples.append([text_segment(self.ctx, pick_caption(corpus, i, gen)),
                            image_segment(corpus, i)])
            masks["image"].append(self._masks(corpus, gen))
        p = pack(samples)
        return {"packed": p, "masked": masked_by_modality(masks), "rows": torch.tensor(rows),
                **self._targets(corpus, rows, masks["image"])}

    def _targets(self, corpus, rows, masks) -> dict:
        return {}

    def _hidden_at_masked(self, model, b) -> torch.Tensor:
        p, m = b["packed"], b["masked"]
        h = model.encode(p, masked=m)
        return h[p.feature_index["image"][m["image"]]]


@OBJECTIVES.register("mrfr")
class MRFR(_MaskedRegions):
    def _targets(self, corpus, rows, masks) -> dict:
        feats = torch.cat([corpus.features[i].float()[m] for i, m in zip(rows, masks)])
        return {"target": feats}

    def loss(self, model, b) -> dict:
        pred = model.mrfr_features(self._hidden_at_masked(model, b)).float()
        loss = F.mse_loss(pred, b["target"].to(pred.device))
        return {"loss": loss, "mrfr": loss.detach(), "tokens": b["packed"].num_tokens}


@OBJECTIVES.register("mrc")
class MRC(_MaskedRegions):
    def _targets(self, corpus, rows, masks) -> dict:
        z = torch.cat([corpus.latents[i].float()[m] for i, m in zip(rows, masks)])
        soft = (z @ self.ctx.codebook.T / self.cfg.mrc_temperature).softmax(-1)
        return {"target": soft}

    def loss(self, model, b) -> dict:
        logits = model.mrc_logits(self._hidden_at_masked(model, b)).float()
        loss = F.kl_div(logits.log_softmax(-1), b["target"].to(logits.device),
                        reduction="batchmean")
        return {"loss": loss, "mrc": loss.detach(), "tokens": b["packed"].num_tokens}


@OBJECTIVES.register("mim")
class MIM(_MaskedRegions):
    """BEiT masked image modelling: predict the VQ code id of blockwise-masked patches."""

    def _masks(self, corpus, gen) -> torch.Tensor:
        r, c = corpus.grid
        return blockwise_mask(r, c, gen, ratio=self.cfg.mim_ratio,
                              min_block=self.cfg.mim_min_block)

    def _targets(self, corpus, rows, masks) -> dict:
        codes = torch.cat([corpus.codes[i][m] for i, m in zip(rows, masks)])
        return {"target": self.ctx.vocab.from_image(codes)}

    def loss(self, model, b) -> dict:
        p, m = b["packed"], b["masked"]
        h = model.encode(p, masked=m)
        logits = model.vocab_logits(h, p.feature_index["image"][m["image"]]).float()
        loss = F.cross_entropy(logits, b["target"].to(logits.device))
        return {"loss": loss, "mim": loss.detach(), "tokens": p.num_tokens}


@OBJECTIVES.register("itm")
class ITM(_Base):
    def batch(self, corpus, idx, gen) -> dict:
        idx = list(idx)
        caps = [pick_caption(corpus, i, gen) for i in idx]
        neg = torch.rand(len(idx), generator=gen) < self.cfg.itm_neg_prob
        other = []
        for i in idx:  # a random other image (never the caption's own)
            j = int(torch.randint(len(corpus) - 1, (1,), generator=gen))
            other.append(j + (j >= i))
        return {"idx": idx, "caps": caps, "neg": neg, "other": other, "corpus": corpus}

    def _pairs(self, model, b) -> tuple:
        idx, neg, corpus = b["idx"], b["neg"], b["corpus"]
        other = list(b["other"])
        if self.cfg.itm_hard_negatives and neg.any():
            other = self._hard(model, b)
        images = [other[k] if neg[k] else i for k, i in enumerate(idx)]
        samples = [[text_segment(self.ctx, c), image_segment(corpus, j)]
                   for c, j in zip(b["caps"], images)]
        return pack(samples), ~neg

    @torch.no_grad()
    def _hard(self, model, b) -> list[int]:
        """ALBEF-style: negatives drawn by ITC similarity within the batch (not itself)."""
        from .itc import embed_pairs

        t, v = embed_pairs(model, self.ctx, b["corpus"], b["idx"], b["caps"])
        sim = (t @ v.T).float()
        sim.fill_diagonal_(float("-inf"))
        g = torch.Generator().manual_seed(int(sum(b["idx"])))
        pick = torch.multinomial(sim.softmax(-1).cpu(), 1, generator=g)[:, 0]
        return [b["idx"][int(j)] for j in pick]

    def loss(self, model, b) -> dict:
        p, pos = self._pairs(model, b)
        h = model.encode(p)
        logits = model.itm(model.pooled(h, p)).float()
        ce = F.cross_entropy(logits, pos.long().to(logits.device))
        wra = self._wra(h, p, pos)
        acc = (logits.argmax(-1) == pos.long().to(logits.device)).float().mean()
        return {"loss": ce + self.cfg.wra_weight * wra, "itm": ce.detach(),
                "wra": wra.detach(), "itm_acc": acc, "tokens": p.num_tokens}

    def _wra(self, h, p, pos) -> torch.Tensor:
        """Word-region alignment: caption tokens (not ``<cls>``) against image positions."""
        seg, starts = p.segment.to(h.device), p.cu_seqlens.long().tolist()
        txt, img = [], []
        for s, e in zip(starts[:-1], starts[1:]):
            txt.append(h[s + 1:e][seg[s + 1:e] == 0])
            img.append(h[s:e][seg[s:e] == 1])
        T, V = (torch.nn.utils.rnn.pad_sequence(x, batch_first=True) for x in (txt, img))
        tpad, vpad = (torch.arange(P.shape[1], device=h.device)[None]
                      >= torch.tensor([len(x) for x in xs], device=h.device)[:, None]
                      for P, xs in ((T, txt), (V, img)))
        return wra_loss(T.float(), V.float(), tpad, vpad, pos.to(h.device),
                        beta=self.cfg.ot_beta, iterations=self.cfg.ot_iterations)

