"""Masked speech-unit prediction (HuBERT / BEST-RQ), optionally conditioned on the caption.

The input is the spoken caption's stacked fbank frames (80 mel bins x 4 frames, one
position per speech unit); spans are masked as in HuBERT / wav2vec2 (span starts with
probability 0.065 per frame, 10 frames each, overlapping: ~50% of the frames covered, as
wav2vec2; HuBERT's 0.08 covers ~57%), masked frames replaced by a learned embedding. Targets are the speech tokenizer's units (k-means or BEST-RQ) at
masked frames only; logits are HuBERT's cosine similarity between a projection of the
output and unit embeddings, divided by 0.1. With probability ``speech_with_text`` the
caption (``<cls>`` + text, unmasked) comes first: cross-modal conditioning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omnimask.errors import OmnimaskError
from omnimask.fusion.packing import Segment, pack
from omnimask.model import init_linear

from .base import Objective, hidden_at_masked, masked_by_modality, objective, text_segment
from .masking import span_mask


class UnitHead(nn.Module):
    """HuBERT's unit head: cosine between a projection of the output and unit embeddings,
    divided by ``model.unit_temperature``."""

    def __init__(self, model_cfg, cfg=None) -> None:
        super().__init__()
        self.proj = nn.Linear(model_cfg.trunk.dim, model_cfg.unit_dim)
        init_linear(self.proj)
        self.embed = nn.Parameter(torch.randn(model_cfg.speech_units, model_cfg.unit_dim) * 0.02)
        self.temperature = model_cfg.unit_temperature

    def no_weight_decay(self) -> set[str]:
        return {"embed"}  # a table scored against, not a linear map

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(h), dim=-1) @ F.normalize(
            self.embed, dim=-1).T / self.temperature

    def forward(self, encoder, b: dict) -> dict:
        logits = self.logits(hidden_at_masked(encoder, b, "speech")).float()
        target = b["target"].to(logits.device)
        loss = F.cross_entropy(logits, target)
        acc = (logits.argmax(-1) == target).float().mean()
        return {"loss": loss, "speech": loss.detach(), "speech_acc": acc,
                "tokens": b["packed"].num_tokens}


@objective("speech")
class SpeechUnits(Objective):
    head = UnitHead

    def batch(self, corpus, idx, gen) -> dict:
        if not corpus.has_speech:
            raise OmnimaskError("objective 'speech' needs shards with speech.flac and a "
                                "speech tokenizer (tokenizers.speech)")
        samples, masks, targets = [], {"speech": []}, []
        for i in idx:
            feats, units = corpus.speech[i].float(), corpus.units[i]
            cap = self.cfg.speech_max_units
            if cap and len(units) > cap:
                s = int(torch.randint(len(units) - cap + 1, (1,), generator=gen))
                feats, units = feats[s:s + cap], units[s:s + cap]
            m = span_mask(len(units), gen, start_prob=self.cfg.speech_start_prob,
                          span=self.cfg.speech_span)
            segs = [Segment("speech", features=feats)]
            if float(torch.rand(1, generator=gen)) < self.cfg.speech_with_text:
                segs.insert(0, text_segment(self.ctx, corpus.captions[i][corpus.spoken[i]]))
            samples.append(segs)
            masks["speech"].append(m)
            targets.append(units[m])
        return {"packed": pack(samples), "masked": masked_by_modality(masks),
                "target": torch.cat(targets)}
