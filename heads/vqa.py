"""VQA answer classifier on the encoder's pooled ``<cls>`` (UNITER's VQA head:
``Linear(H, 2H) - GELU - LayerNorm - Linear(2H, num_answers)``). Its loss (binary
cross-entropy on soft answer scores) and metrics arrive with the task-heads issue; the
forward returns the logits."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from omnimask.config import check_fields
from omnimask.model import init_linear
from omnimask.registry import HEADS


@dataclass
class VQAHeadConfig:
    num_answers: int = 3129  # VQA v2's answer vocabulary (UNITER, ViLBERT)

    def __post_init__(self) -> None:
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

    def forward(self, encoder, batch: dict) -> dict:
        """``batch["packed"]``: one question + image per sample -> logits [B, num_answers]."""
        p = batch["packed"]
        return {"logits": self.classifier(encoder.pooled(encoder(p), p))}
