"""VQA answer classifier (UNITER's VQA head): ``Linear(H, 2H) - GELU - LayerNorm -
Linear(2H, num_answers)`` on the pooled ``<cls>`` of each question, trained with binary
cross-entropy on soft answer scores (summed over answers, averaged over questions), or
(``loss=softmax``) cross-entropy against the scores normalised to a distribution, for
data where each question has one right answer.

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

from omnimask.config import check_fields
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

    def __post_init__(self) -> None:
        if self.loss not in ("bce", "softmax"):
            raise ValueError(f"heads.vqa.loss must be bce or softmax, got {self.loss!r}")
        if self.answers:
            self.answers = [str(a) for a in self.answers]
            if len(set(self.answers)) != len(self.answers):
                raise ValueError("heads.vqa.answers has repeated answers")
            self.num_answers = len(self.answers)
        check_fields(self, ">=1", "num_answers", prefix="heads.vqa.")


@HEADS.register("vqa")
class VQAHead(nn.Module):
    Config = VQAHeadConfig

    def __init__(self, model_cfg, cfg: VQAHeadConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or VQAHeadConfig()
        d = model_cfg.trunk.dim
        self.classifier = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(),
                                        nn.LayerNorm(2 * d, eps=1e-12),
                                        nn.Linear(2 * d, self.cfg.num_answers))
        init_linear(self.classifier[0], self.classifier[3])

    def logits(self, encoder, batch: dict) -> torch.Tensor:
        """[Q, num_answers]: one row per question (``batch["cls"]`` positions when
        questions are packed as blocks, else each sample's first position)."""
        p = batch["packed"]
        if "blocks" in batch:
            h = encoder(p, mask="blocks", prefix_len=batch["blocks"])
            return self.classifier(encoder.pooled(h, p, batch["cls"]))
        return self.classifier(encoder.pooled(encoder(p), p))

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Each answer's probability: sigmoids (bce) or one softmax (softmax)."""
        lf = logits.float()
        return lf.softmax(-1) if self.cfg.loss == "softmax" else lf.sigmoid()

    def forward(self, encoder, batch: dict) -> dict:
        logits = self.logits(encoder, batch)
        out = {"logits": logits}
        if "target" in batch:
            t = batch["target"].to(logits.device)
            lf = logits.float()
            if self.cfg.loss == "softmax":  # questions without an answer in the vocabulary: 0
                dist = t / t.sum(-1, keepdim=True).clamp_min(1e-12)
                loss = -(dist * lf.log_softmax(-1)).sum() / len(t)
            else:
                loss = F.binary_cross_entropy_with_logits(lf, t, reduction="sum") / len(t)
            acc = t.gather(1, lf.argmax(-1, keepdim=True)).mean()
            out |= {"loss": loss, "vqa": loss.detach(), "vqa_acc": acc.detach(),
                    "tokens": batch["packed"].num_tokens}
        return out
