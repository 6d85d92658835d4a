"""UNITER's objectives with conditional masking (one modality masked per example).

- ``mlm``: caption tokens masked (15%, 80/10/10, at least one; optional n-gram or
  whole-word units), the image intact; cross-entropy at masked tokens.
- ``mrfr``: image patches masked (p=0.15 each, at least one: the projected feature replaced
  by a learned mask embedding), the caption intact; regress the original feature (MSE);
  from pixels (``model.image_input=pixels``: masked patches blanked in the image too) the
  patch's frozen VQ latent.
- ``mrc``: same masking; KL(target || model) against a soft target. UNITER's target is
  the detector's class distribution; ours is the VQ tokenizer's code distribution,
  ``softmax(cos(latent, codes) / t)`` (an rq tokenizer: over its first level's codes).
- ``mim``: BEiT: blockwise-masked patches (~40%) predict their VQ code ids through the
  vocabulary head (an rq tokenizer's stacks: their first level, one code per patch).
- ``itm``: with p=0.5 the image is replaced by another one (random or, as an option,
  sampled by ITC similarity); Linear(H, 2) on the pooled ``<cls>``; plus word-region
  alignment by optimal transport (IPOT) with weight 0.1 on the signed OT distance.

Heads (``model.heads.<name>``, each ``forward(encoder, batch) -> loss dict``): MLM and MIM
use the encoder's vocabulary head (no parameters of their own); MRFR is Linear-GELU-LN,
then the image input projection transposed + its own bias; MRC is Linear-GELU-LN-Linear to
a code vector scored (cosine / ``model.mrc_temperature``) against the VQ codebook, as the
soft target is built; ITM is Linear(H, 2) on the encoder's pooled ``<cls>``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from omnimask.fusion.packing import pack
from omnimask.heads.matching import pair_features
from omnimask.model import init_linear, mlp_ln

from .base import (
    Objective,
    TokenPrediction,
    hidden_at_masked,
    image_segment,
    masked_by_modality,
    objective,
    pick_caption,
    text_segment,
)
from .masking import blockwise_mask, mlm_mask, region_mask
from .ot import wra_loss


class MLMHead(TokenPrediction):
    task = "mlm"


@objective("mlm")
class MLM(Objective):
    head = MLMHead

    def batch(self, corpus, idx, gen) -> dict:
        c, samples = self.ctx, []
        lo, hi = c.vocab.ranges()["text"]
        for i in idx:
            ids = torch.tensor(pick_caption(corpus, i, gen))
            inp, tgt = mlm_mask(ids, gen, mask_id=c.sp("mask"), random_range=(lo, hi),
                                prob=self.cfg.mlm_prob, max_ngram=self.cfg.mlm_max_ngram,
                                word_starts=c.word_start[ids] if self.cfg.mlm_whole_word
                                else None)
            samples.append([text_segment(c, inp, tgt), image_segment(corpus, i, c.pixels)])
        return {"packed": pack(samples)}


class _MaskedRegions(Objective):
    """Caption intact, image patches masked: shared by MRFR, MRC and MIM."""

    def _masks(self, corpus, gen) -> torch.Tensor:
        r, c = corpus.grid
        return region_mask(r * c, gen, self.cfg.mrm_prob)

    def batch(self, corpus, idx, gen) -> dict:
        samples, masks, rows = [], {"image": []}, list(idx)
        for i in rows:
            samples.append([text_segment(self.ctx, pick_caption(corpus, i, gen)),
                            image_segment(corpus, i, self.ctx.pixels)])
            masks["image"].append(self._masks(corpus, gen))
        p = pack(samples)
        return {"packed": p, "masked": masked_by_modality(masks), "rows": torch.tensor(rows),
                **self._targets(corpus, rows, masks["image"])}

    def _targets(self, corpus, rows, masks) -> dict:
        return {}


class MRFRHead(nn.Module):
    def __init__(self, model_cfg, cfg=None) -> None:
        super().__init__()
        self.transform = mlp_ln(model_cfg.trunk.dim)
        self.bias = nn.Parameter(torch.zeros(model_cfg.image_feature_dim))

    def features(self, encoder, h: torch.Tensor) -> torch.Tensor:
        """Predicted input features: the image projection transposed (+ own bias)."""
        return self.transform(h) @ encoder.embedders["image"].proj.weight + self.bias

    def forward(self, encoder, b: dict) -> dict:
        pred = self.features(encoder, hidden_at_masked(encoder, b, "image")).float()
        loss = F.mse_loss(pred, b["target"].to(pred.device))
        return {"loss": loss, "mrfr": loss.detach(), "tokens": b["packed"].num_tokens}


@objective("mrfr")
class MRFR(_MaskedRegions):
    head = MRFRHead

    def _targets(self, corpus, rows, masks) -> dict:
        # from pixels the input is the encoder's own moving output: regress a fixed target,
        # the masked patch's frozen VQ latent, instead
        src = corpus.latents if self.ctx.pixels else corpus.features
        return {"target": torch.cat([src[i].float()[m] for i, m in zip(rows, masks)])}


class MRCHead(nn.Module):
    def __init__(self, model_cfg, cfg=None) -> None:
        super().__init__()
        # MRC classifies into VQ codes whose vectors are known: the head predicts a latent
        # and scores it against the (frozen) codebook, as the soft target is built
        self.transform = nn.Sequential(mlp_ln(model_cfg.trunk.dim),
                                       nn.Linear(model_cfg.trunk.dim, model_cfg.code_dim))
        init_linear(self.transform[1])
        self.temperature = model_cfg.mrc_temperature
        self.codes = model_cfg.image_codes // model_cfg.image_code_depth  # rq: the first level

    def logits(self, encoder, h: torch.Tensor) -> torch.Tensor:
        codes = encoder.embedders["image"].codebook[:self.codes]
        return F.normalize(self.transform(h), dim=-1) @ codes.T / self.temperature

    def forward(self, encoder, b: dict) -> dict:
        logits = self.logits(encoder, hidden_at_masked(encoder, b, "image")).float()
        loss = F.kl_div(logits.log_softmax(-1), b["target"].to(logits.device),
                        reduction="batchmean")
        return {"loss": loss, "mrc": loss.detach(), "tokens": b["packed"].num_tokens}


@objective("mrc")
class MRC(_MaskedRegions):
    head = MRCHead

    def _targets(self, corpus, rows, masks) -> dict:
        z = torch.cat([corpus.latents[i].float()[m] for i, m in zip(rows, masks)])
        codes = self.ctx.codebook[:self.ctx.level_size()]  # rq: the first level's codes
        soft = (z @ F.normalize(codes, dim=-1).T / self.cfg.mrc_temperature).softmax(-1)
        return {"target": soft}


class MIMHead(TokenPrediction):
    task = "mim"

    def targets(self, b: dict) -> tuple[torch.Tensor, torch.Tensor]:
        p, m = b["packed"], b["masked"]
        return p.feature_index["image"][m["image"]], b["target"]


@objective("mim")
class MIM(_MaskedRegions):
    """BEiT masked image modelling: predict the VQ code id of blockwise-masked patches."""

    head = MIMHead

    def _masks(self, corpus, gen) -> torch.Tensor:
        r, c = corpus.grid
        return blockwise_mask(r, c, gen, ratio=self.cfg.mim_ratio,
                              min_block=self.cfg.mim_min_block)

    def _targets(self, corpus, rows, masks) -> dict:
        # an rq tokenizer's stacks: the first level (one code per patch, as BEiT's)
        d = self.ctx.depth
        codes = torch.cat([corpus.codes[i].view(-1, d)[m, 0] for i, m in zip(rows, masks)])
        return {"target": self.ctx.vocab.from_image(codes)}


@dataclass
class ITMHeadConfig:
    """The ITM loss: cross-entropy + ``wra_weight`` x word-region alignment (IPOT)."""

    wra_weight: float = 0.1
    ot_beta: float = 0.5
    ot_iterations: int = 50
    # "cls": UNITER's Linear(H, 2) on the pooled <cls>; "pair": on [<cls>, u*v, |u-v|] with u,
    # v the mean fused caption and image states (InferSent's matching features: the product
    # gives a text-image interaction from the first step, before attention has learned one)
    features: str = "cls"


class ITMHead(nn.Module):
    Config = ITMHeadConfig

    def __init__(self, model_cfg, cfg: ITMHeadConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or ITMHeadConfig()
        if self.cfg.features not in ("cls", "pair"):
            raise ValueError(f"objectives.itm_features must be cls or pair, got "
                             f"{self.cfg.features!r}")
        d = model_cfg.trunk.dim
        self.fc = nn.Linear(d if self.cfg.features == "cls" else 3 * d, 2)
        init_linear(self.fc)

    def logits(self, encoder, h: torch.Tensor, p) -> torch.Tensor:
        """[B, 2] (no match, match) from the pooled ``<cls>`` of each pair (and, with
        ``features="pair"``, the product and distance of its mean caption and image states)."""
        return self.fc(pair_features(encoder, h, p, self.cfg.features))

    def forward(self, encoder, b: dict) -> dict:
        p, pos = b["packed"], b["positive"]
        h = encoder(p)
        logits = self.logits(encoder, h, p).float()
        label = pos.long().to(logits.device)
        ce = F.cross_entropy(logits, label)
        wra = self._wra(h, p, pos)
        acc = (logits.argmax(-1) == label).float().mean()
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


@objective("itm")
class ITM(Objective):
    head = ITMHead

    @classmethod
    def head_config(cls, c) -> ITMHeadConfig:
        return ITMHeadConfig(wra_weight=c.wra_weight, ot_beta=c.ot_beta,
                             ot_iterations=c.ot_iterations, features=c.itm_features)

    def batch(self, corpus, idx, gen) -> dict:
        idx = list(idx)
        caps = [pick_caption(corpus, i, gen) for i in idx]
        neg = torch.rand(len(idx), generator=gen) < self.cfg.itm_neg_prob
        other = []
        for i in idx:  # a random other image (never the caption's own)
            j = int(torch.randint(len(corpus) - 1, (1,), generator=gen))
            other.append(j + (j >= i))
        return {"idx": idx, "caps": caps, "neg": neg, "other": other, "corpus": corpus}

    def inputs(self, model, b: dict) -> dict:
        """The pairs, packed: drawn here because hard negatives ask the model."""
        p, pos = self._pairs(model, b)
        return {"packed": p, "positive": pos}

    def _pairs(self, model, b) -> tuple:
        idx, neg, corpus = b["idx"], b["neg"], b["corpus"]
        other = list(b["other"])
        if self.cfg.itm_hard_negatives and neg.any():
            other = self._hard(model, b)
        images = [other[k] if neg[k] else i for k, i in enumerate(idx)]
        samples = [[text_segment(self.ctx, c), image_segment(corpus, j, self.ctx.pixels)]
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
