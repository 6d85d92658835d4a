"""The pretraining model: input embedders for every modality, the shared trunk, and the
small heads the objectives need.

Inputs reach the trunk as one :class:`~omnimask.fusion.packing.PackedBatch`: token ids
(text, VQ codes, speech units: one shared vocabulary) go through the trunk's embedding;
continuous inputs (image patch features, stacked speech fbank frames) through a linear
projection and a LayerNorm per modality (UNITER's image embedding). A masked feature position gets its feature zeroed and a learned
mask embedding added (UNITER MRM; HuBERT replaces masked frames by a learned vector).

Heads (``../shared/objectives.md``): UNITER's pooler (Linear + tanh on the first token),
ITM (Linear(H, 2)), MRFR (Linear-GELU-LN, then the image input projection transposed +
own bias), MRC (Linear-GELU-LN-Linear to the VQ codes), ITC projections with a learnable
temperature, and HuBERT's unit head (cosine between a projection of the output and unit
embeddings, divided by 0.1). MLM, masked VQ-code prediction and CM3 use the trunk's
vocabulary head, tied to the token embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from omnimask.fusion.packing import PackedBatch
from omnimask.fusion.trunk import Trunk, TrunkConfig


@dataclass
class ModelConfig:
    trunk: TrunkConfig = field(default_factory=TrunkConfig)
    image_feature_dim: int = 32  # set from the corpus
    speech_feature_dim: int = 320  # 80 mel bins x 4 stacked frames
    image_codes: int = 1024  # set from the image tokenizer
    speech_units: int = 500  # set from the speech tokenizer
    itc_dim: int = 128
    itc_temperature: float = 0.07  # initial; learnable, clamped at 1/100
    unit_dim: int = 64  # HuBERT final_dim
    unit_temperature: float = 0.1


def _mlp_ln(dim: int, eps: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim, eps=eps))


class PretrainModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.trunk = Trunk(cfg.trunk)
        d, eps = cfg.trunk.dim, 1e-12
        self.image_in = nn.Linear(cfg.image_feature_dim, d)
        self.speech_in = nn.Linear(cfg.speech_feature_dim, d)
        # UNITER normalises the projected image features (img_linear -> LayerNorm): without
        # it, small random projections leave every image looking alike next to the position
        # embeddings, and contrastive/matching objectives stalled in our runs
        self.input_norm = nn.ModuleDict({"image": nn.LayerNorm(d, eps=eps),
                                         "speech": nn.LayerNorm(d, eps=eps)})
        self.mask_embed = nn.ParameterDict({"image": nn.Parameter(torch.zeros(d)),
                                            "speech": nn.Parameter(torch.zeros(d))})
        self.pooler = nn.Linear(d, d)
        self.itm = nn.Linear(d, 2)
        self.mrfr = _mlp_ln(d, eps)
        self.mrfr_bias = nn.Parameter(torch.zeros(cfg.image_feature_dim))
        self.mrc = nn.Sequential(_mlp_ln(d, eps), nn.Linear(d, cfg.image_codes))
        # no bias (CLIP): a bias lets both towers collapse onto one direction, which ITC
        # did within 25 steps in our runs
        self.itc_text = nn.Linear(d, cfg.itc_dim, bias=False)
        self.itc_image = nn.Linear(d, cfg.itc_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.itc_temperature)))
        self.unit_proj = nn.Linear(d, cfg.unit_dim)
        self.unit_embed = nn.Parameter(torch.randn(cfg.speech_units, cfg.unit_dim) * 0.02)
        for m in (self.image_in, self.speech_in, self.pooler, self.itm, self.mrfr[0],
                  self.mrc[0][0], self.mrc[1], self.itc_text, self.itc_image, self.unit_proj):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_embed["image"], std=0.02)
        nn.init.normal_(self.mask_embed["speech"], std=0.02)

    # -- inputs ------------------------------------------------------------------------------
    def input_features(self, batch: PackedBatch, masked: dict[str, torch.Tensor] | None = None
                       ) -> torch.Tensor | None:
        """[T, dim] projected continuous inputs at feature positions (zeros elsewhere)."""
        if not batch.features:
            return None
        masked = masked or {}
        dev = batch.ids.device
        out = torch.zeros(batch.num_tokens, self.cfg.trunk.dim, device=dev,
                          dtype=self.image_in.weight.dtype)
        for m, feats in batch.features.items():
            proj = self.image_in if m == "image" else self.speech_in
            feats = feats.to(dev, proj.weight.dtype)
            norm = self.input_norm[m]
            if m in masked:
                mk = masked[m].to(dev)[:, None]
                h = norm(proj(feats.masked_fill(mk, 0.0))) + mk * self.mask_embed[m]
            else:
                h = norm(proj(feats))
            out = out.index_copy(0, batch.feature_index[m].to(dev), h.to(out.dtype))
        return out

    def encode(self, batch: PackedBatch, mask: str = "bidirectional", prefix_len=None,
               masked: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Hidden states [T, dim]."""
        return self.trunk(batch, mask, prefix_len, features=self.input_features(batch, masked))

    # -- heads -------------------------------------------------------------------------------
    def pooled(self, hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """UNITER pooler on each sample's first position: [B, dim]."""
        first = batch.cu_seqlens[:-1].long().to(hidden.device)
        return torch.tanh(self.pooler(hidden[first]))

    def vocab_logits(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.trunk.mlm_logits(hidden, positions)

    def mrfr_features(self, h: torch.Tensor) -> torch.Tensor:
        return self.mrfr(h) @ self.image_in.weight + self.mrfr_bias

    def unit_logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.unit_proj(h), dim=-1) @ F.normalize(
            self.unit_embed, dim=-1).T / self.cfg.unit_temperature
