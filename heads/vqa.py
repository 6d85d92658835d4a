"""VQA answer classifier (UNITER's VQA head): ``Linear(H, 2H) - GELU - LayerNorm -
Linear(2H, num_answers)`` on the pooled ``<cls>`` of each question, trained with binary
cross-entropy on soft answer scores (summed over answers, averaged over questions), or
(``loss=softmax``) cross-entropy against the scores normalised to a distribution, for
data where each question has one right answer.

With ``glimpses`` > 0 the classifier also reads attention glimpses over the question's
image tokens (bottom-up top-down attention's top-down step, with UNITER's use of region
coordinates): each glimpse is a query from the question's ``<cls>`` state, a softmax
over the image tokens, and returns the attended mean of their states and of their grid
coordinates (row and column in [-1, 1]), so where the attended object lies is a number
the classifier can compare between glimpses. Where the data says which objects a question
looks at (``batch["ground"]``, GQA-style pointers), the glimpses' attention is supervised
towards them (cross-entropy, the task's ``ground_weight``): attention supervision, as in
human-attention and grounding-supervised VQA models.

Several questions of one image share one packed sequence: the image is the shared
context (block 0) and each question a block of its own (mask ``blocks``: a question sees
the image and itself, the image only itself), so the image is encoded once. The batch
gives each question's ``<cls>`` position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from omnimask.config import check_choice, check_fields
from omnimask.fusion.packing import group_slots
from omnimask.modalities.vocab import MODALITIES
from omnimask.model import init_linear
from omnimask.registry import HEADS


@dataclass
class VQAHeadConfig:
    # the answer vocabulary, most frequent first (set from the training data); empty: only
    # num_answers is known
    answers: list[str] = field(default_factory=list)
    num_answers: int = 3129  # VQA v2's answer vocabulary (UNITER, ViLBERT); len(answers) if set
    # question type -> the training data's most frequent answer (the prior baseline)
    priors: dict[str, str] = field(default_factory=dict)
    # bce: UNITER's sigmoid per answer; softmax: one distribution over the answers (scores
    # are then softmax probabilities)
    loss: str = "bce"
    glimpses: int = 0  # attention glimpses over the image tokens (0: the pooled <cls> alone)
    # with >= 2 glimpses: this many question-conditioned projections of each pair of
    # glimpses' coordinate differences (FiLM-style), read by the classifier; 0: none
    relation_probes: int = 0

    def __post_init__(self) -> None:
        check_choice(self, "loss", ("bce", "softmax"), prefix="heads.vqa.")
        if self.answers:
            self.answers = [str(a) for a in self.answers]
            if len(set(self.answers)) != len(self.answers):
                raise ValueError("heads.vqa.answers has repeated answers")
            self.num_answers = len(self.answers)
        check_fields(self, ">=1", "num_answers", prefix="heads.vqa.")
        check_fields(self, ">=0", "glimpses", "relation_probes", prefix="heads.vqa.")
        if self.relation_probes and self.glimpses < 2:
            raise ValueError("heads.vqa.relation_probes compares glimpses: it needs "
                             "heads.vqa.glimpses >= 2")


def question_means(h: torch.Tensor, p, cls: torch.Tensor) -> torch.Tensor:
    """[Q, dim]: the mean state of the text tokens of each question (the packed segment
    that starts at ``cls``)."""
    T = len(h)
    sample = torch.bucketize(torch.arange(T, device=h.device),
                             p.cu_seqlens[1:].to(h.device).long(), right=True)
    key = sample * (int(p.segment.max()) + 1) + p.segment.to(h.device)
    txt = p.modality.to(h.device) == MODALITIES.index("text")
    n = int(key.max()) + 1
    sums = torch.zeros(n, h.shape[1], dtype=h.dtype, device=h.device).index_add_(
        0, key[txt], h[txt])
    counts = torch.bincount(key[txt], minlength=n).clamp_min(1)
    return (sums / counts[:, None].to(h.dtype))[key[cls]]


def image_tokens(p) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each sample's image-grid tokens: positions [S, N] (padded with 0), valid [S, N] and
    coordinates [S, N, 2] (row, col scaled to [-1, 1] by the sample's grid size)."""
    S = len(p.cu_seqlens) - 1
    dev = p.position_2d.device
    on = (p.modality == MODALITIES.index("image")) & (p.position_2d[:, 0] >= 0)
    pos = on.nonzero().squeeze(1)
    sample = torch.bucketize(pos, p.cu_seqlens[1:].to(dev).long(), right=True)
    slot, counts = group_slots(sample, S)
    n = int(counts.max()) if len(pos) else 1
    idx = torch.zeros(S, n, dtype=torch.long, device=dev)
    valid = torch.zeros(S, n, dtype=torch.bool, device=dev)
    idx[sample, slot], valid[sample, slot] = pos, True
    rc = p.position_2d[pos].float()
    side = torch.zeros(S, 2, device=dev).scatter_reduce_(0, sample[:, None].expand(-1, 2), rc,
                                                         "amax")
    coords = torch.zeros(S, n, 2, device=dev)
    coords[sample, slot] = 2 * rc / side[sample].clamp_min(1) - 1
    return idx, valid, coords


@HEADS.register("vqa")
class VQAHead(nn.Module):
    Config = VQAHeadConfig

    def __init__(self, model_cfg, cfg: VQAHeadConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or VQAHeadConfig()
        d, g = model_cfg.trunk.dim, self.cfg.glimpses
        if g:
            self.query = nn.Linear(d, g * d)
            # no key bias: it adds the same logit to every token of a query, so softmax
            # ignores it and its gradient is rounding noise (which Adam would amplify)
            self.key = nn.Linear(d, d, bias=False)
            self.value = nn.Linear(d, d)
            init_linear(self.query, self.key, self.value)
        k = self.cfg.relation_probes
        pairs = g * (g - 1) // 2
        if k:
            self.probes = nn.Linear(d, k * pairs * 2)
            init_linear(self.probes)
        inp = d + g * (d + 2) + k * pairs
        self.classifier = nn.Sequential(nn.Linear(inp, 2 * d), nn.GELU(),
                                        nn.LayerNorm(2 * d, eps=1e-12),
                                        nn.Linear(2 * d, self.cfg.num_answers))
        init_linear(self.classifier[0], self.classifier[3])

    def glimpse(self, h: torch.Tensor, p, cls: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """[Q, glimpses * (dim + 2)]: per glimpse, the attended image state and (row, col);
        and the attention [Q, glimpses, N] over each question's image tokens (raster
        order)."""
        idx, valid, coords = image_tokens(p)
        S, N = idx.shape
        Q, d, g = len(cls), h.shape[-1], self.cfg.glimpses
        img = h[idx]  # [S, N, d]: keys and values once per image, not once per question
        k, v = self.key(img), self.value(img)
        # each question's slot among its sample's questions: the queries padded to [S, M]
        s = torch.bucketize(cls, p.cu_seqlens[1:].to(cls.device).long(), right=True)
        slot, counts = group_slots(s, S)
        M = int(counts.max()) if Q else 1
        q = self.query(h[cls])
        qp = q.new_zeros(S, M, g * d).index_put((s, slot), q)
        a = torch.bmm(qp.view(S, M * g, d), k.transpose(1, 2).to(qp.dtype))
        a = a.view(S, M, g, N)[s, slot] / d ** 0.5  # [Q, g, N]
        a = a.masked_fill(~valid[s][:, None], float("-inf")).softmax(-1).nan_to_num(0.0)
        ap = a.new_zeros(S, M, g, N).index_put((s, slot), a)
        vx = torch.cat([v, coords.to(v.dtype)], -1).to(ap.dtype)  # [S, N, d + 2]
        out = torch.bmm(ap.view(S, M * g, N), vx).view(S, M, g, d + 2)[s, slot]
        return out.flatten(1), a

    def logits(self, encoder, batch: dict) -> torch.Tensor:
        """[Q, num_answers]: one row per question (``batch["cls"]`` positions when
        questions are packed as blocks, else each sample's first position)."""
        return self._logits(encoder, batch)[0]

    def _logits(self, encoder, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        p = batch["packed"]
        if "blocks" in batch:
            h, cls = encoder(p, mask="blocks", prefix_len=batch["blocks"]), batch["cls"]
        else:
            h, cls = encoder(p), p.cu_seqlens[:-1]
        cls = cls.long().to(h.device)
        x, attn = encoder.pooled(h, p, cls), None
        if self.cfg.glimpses:
            g, attn = self.glimpse(h, p.to(h.device), cls)
            x = torch.cat([x, g], -1)
            if self.cfg.relation_probes:
                x = torch.cat([x, self.relations(h, p, cls, g)], -1)
        return self.classifier(x), attn

    def relations(self, h, p, cls, g: torch.Tensor) -> torch.Tensor:
        """[Q, probes * pairs]: each pair of glimpses' (row, col) difference projected on
        directions the question's mean state chooses (a left/right question can pick the
        column axis and a sign)."""
        Q, G, d = len(cls), self.cfg.glimpses, h.shape[-1]
        xy = g.view(Q, G, d + 2)[..., d:]  # [Q, G, 2]
        i, j = torch.triu_indices(G, G, 1, device=h.device)
        diff = xy[:, i] - xy[:, j]  # [Q, pairs, 2]
        w = self.probes(question_means(h, p, cls)).view(Q, self.cfg.relation_probes,
                                                         len(i), 2)
        return torch.einsum("qkpc,qpc->qkp", w, diff).flatten(1)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Each answer's probability: sigmoids (bce) or one softmax (softmax)."""
        lf = logits.float()
        return lf.softmax(-1) if self.cfg.loss == "softmax" else lf.sigmoid()

    def forward(self, encoder, batch: dict) -> dict:
        logits, attn = self._logits(encoder, batch)
        out = {"logits": logits}
        if "target" in batch:
            t = batch["target"].to(logits.device)
            lf = logits.float()
            # a question-only expert's log-ratios join the logits in the loss only (PoE)
            lt = lf + batch["prior"].to(lf.device) if "prior" in batch else lf
            if self.cfg.loss == "softmax":  # questions without an answer in the vocabulary: 0
                dist = t / t.sum(-1, keepdim=True).clamp_min(1e-12)
                loss = -(dist * lt.log_softmax(-1)).sum() / len(t)
            else:
                loss = F.binary_cross_entropy_with_logits(lt, t, reduction="sum") / len(t)
            acc = t.gather(1, lf.argmax(-1, keepdim=True)).mean()
            out |= {"vqa": loss.detach(), "vqa_acc": acc.detach(),
                    "tokens": batch["packed"].num_tokens}
            if "ground" in batch:
                ground, hit = grounding_loss(attn, batch["ground"].to(logits.device))
                loss = loss + batch["ground_weight"] * ground
                out |= {"ground": ground.detach()} | ({} if hit is None else {"ground_hit": hit})
            out["loss"] = loss
        return out


def grounding_loss(attn: torch.Tensor | None, target: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cross-entropy of the glimpses' attention [Q, G, N] to target distributions
    [Q, G', N] over the image tokens (all-zero rows: no target), averaged over the
    supervised (question, glimpse) pairs; and the share of those whose most attended token
    lies in the target's support (None without targets)."""
    if attn is None or target.shape[1] > attn.shape[1] or target.shape[2] != attn.shape[2]:
        raise ValueError(f"grounding targets {tuple(target.shape)} do not fit the glimpses' "
                         f"attention {None if attn is None else tuple(attn.shape)} "
                         "(heads.vqa.glimpses, the image grid)")
    a = attn[:, :target.shape[1]].float()
    on = target.sum(-1) > 0
    if not on.any():
        return a.sum() * 0.0, None
    ce = -(target * a.clamp_min(1e-12).log()).sum(-1)[on].mean()
    hit = (target.gather(-1, a.argmax(-1, keepdim=True)).squeeze(-1) > 0)[on].float().mean()
    return ce, hit.detach()
