"""The pretraining model: input embedders for every modality, the shared trunk, and the
small heads the objectives need.

Inputs reach the trunk as one :class:`~omnimask.fusion.packing.PackedBatch`: token ids
(text, VQ codes, speech units: one shared vocabulary) go through the trunk's embedding;
continuous inputs (image patch features, stacked speech fbank frames) through a linear
projection and a LayerNorm per modality (UNITER's image embedding); speech frames then get
wav2vec2/HuBERT's convolutional position embedding, per utterance. A masked feature
position is replaced, after the projection and its norm, by a learned mask embedding
(HuBERT/wav2vec2's ``mask_emb``; UNITER MRM zeroes the feature instead): nothing of the
masked feature reaches the trunk.

Heads (``../shared/objectives.md``): UNITER's pooler (Linear + tanh on the first token),
ITM (Linear(H, 2)), MRFR (Linear-GELU-LN, then the image input projection transposed +
own bias), MRC (Linear-GELU-LN-Linear to a code vector scored against the VQ codebook),
ITC projections without bias and a learnable temperature, and HuBERT's unit head (cosine between a projection of the output and unit
embeddings, divided by 0.1). MLM, masked VQ-code prediction and CM3 use the trunk's
vocabulary head, tied to the token embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

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
    # BatchNorm (no affine, running statistics in eval) on the pooled states before the ITC
    # projections, as in SimCLR's projection head: a component that every sample's states
    # share does not reach the embeddings (ITC+ITM at lr 2e-3: ITC 1.24 at step 600 with
    # it, 2.90 without). Under DDP each rank normalises with its own batch
    itc_batchnorm: bool = False
    unit_dim: int = 64  # HuBERT final_dim
    unit_temperature: float = 0.1
    speech_conv_kernel: int = 15  # wav2vec2/HuBERT convolutional position embedding; 0: off
    speech_conv_groups: int = 16
    code_dim: int = 32  # VQ code vectors (set from the image tokenizer)
    # how VQ code ids (CM3 documents, generation) enter the trunk: "embedding" = a token
    # embedding row; "features" = their code vector through the image input projection +
    # LayerNorm, the path the VQ latents take in the other objectives (one image input)
    image_code_input: str = "embedding"
    image_code_offset: int = -1  # first image-code id in the shared vocabulary (set from it)
    mrc_temperature: float = 0.1  # MRC logits: cos(predicted latent, codes) / t


def _isometry(n_in: int, n_out: int, g: torch.Generator) -> torch.Tensor:
    """[n_in, n_out] random map that keeps inner products when n_out >= n_in (orthonormal
    rows), else a random orthogonal projection."""
    q, _ = torch.linalg.qr(torch.randn(max(n_in, n_out), min(n_in, n_out), generator=g))
    return q.T if n_out >= n_in else q


def _mlp_ln(dim: int, eps: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim, eps=eps))


class PretrainModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.image_code_input not in ("features", "embedding"):
            raise ValueError("model.image_code_input must be embedding or features, got "
                             f"{cfg.image_code_input!r}")
        if cfg.image_code_input == "features" and cfg.image_feature_dim != cfg.code_dim:
            raise ValueError("model.image_code_input=features needs image features that are "
                             f"VQ latents (dim {cfg.code_dim}), got dim {cfg.image_feature_dim}")
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
        k = cfg.speech_conv_kernel
        if k and k % 2 == 0:
            raise ValueError(f"model.speech_conv_kernel must be odd, got {k}")
        self.speech_conv = (nn.Conv1d(d, d, k, padding=k // 2, groups=cfg.speech_conv_groups)
                            if k else None)
        self.mask_embed = nn.ParameterDict({"image": nn.Parameter(torch.zeros(d)),
                                            "speech": nn.Parameter(torch.zeros(d))})
        self.pooler = nn.Linear(d, d)
        self.itm = nn.Linear(d, 2)
        self.mrfr = _mlp_ln(d, eps)
        self.mrfr_bias = nn.Parameter(torch.zeros(cfg.image_feature_dim))
        # MRC classifies into VQ codes whose vectors are known: the head predicts a latent
        # and scores it against the (frozen) codebook, as the soft target is built
        self.mrc = nn.Sequential(_mlp_ln(d, eps), nn.Linear(d, cfg.code_dim))
        self.register_buffer("codebook", F.normalize(torch.randn(cfg.image_codes, cfg.code_dim),
                                                     dim=-1))
        # no bias (CLIP): a bias lets both towers collapse onto one direction, which ITC
        # did within 25 steps in our runs
        self.itc_text = nn.Linear(d, cfg.itc_dim, bias=False)
        self.itc_image = nn.Linear(d, cfg.itc_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.itc_temperature)))
        self.itc_norm = nn.ModuleDict({m: nn.BatchNorm1d(d, affine=False) if cfg.itc_batchnorm
                                       else nn.Identity() for m in ("text", "image")})
        self.unit_proj = nn.Linear(d, cfg.unit_dim)
        self.unit_embed = nn.Parameter(torch.randn(cfg.speech_units, cfg.unit_dim) * 0.02)
        for m in (self.image_in, self.speech_in, self.pooler, self.itm, self.mrfr[0],
                  self.mrc[0][0], self.mrc[1], self.itc_text, self.itc_image, self.unit_proj):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_embed["image"], std=0.02)
        nn.init.normal_(self.mask_embed["speech"], std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Parameters used as embedding tables that are not ``nn.Embedding`` weights: the
        trainer's ``param_groups`` exempts them from weight decay, as it does embeddings."""
        return {"unit_embed", "mask_embed.image", "mask_embed.speech"}

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
            h = self.input_norm[m](proj(feats))
            if m in masked:
                # replaced after the norm (HuBERT's mask_emb): a zeroed feature through the
                # LayerNorm (eps 1e-12) gave input-bias gradients of ~1e5-1e6 at initialisation
                h = torch.where(masked[m].to(dev)[:, None], self.mask_embed[m].to(h.dtype), h)
            if m == "speech" and self.speech_conv is not None:
                h = h + self._conv_per_segment(h, batch, batch.feature_index[m])
            out = out.index_copy(0, batch.feature_index[m].to(dev), h.to(out.dtype))
        return out

    def _conv_per_segment(self, h: torch.Tensor, batch: PackedBatch, index: torch.Tensor
                          ) -> torch.Tensor:
        """wav2vec2's convolutional position embedding (GELU(conv(x)), added), over each
        contiguous run of frames alone: it never mixes two utterances. Masked frames get
        their neighbours' content through it, as in HuBERT."""
        run = batch.sample_index().to(index.device)[index] * 4096 + batch.segment.to(
            index.device)[index]  # one id per (sample, segment)
        cuts = (torch.nonzero(run[1:] != run[:-1]).flatten() + 1).tolist()
        parts = torch.tensor_split(h, cuts)
        return torch.cat([F.gelu(self.speech_conv(x.T[None])[0].T) for x in parts])

    def encode(self, batch: PackedBatch, mask: str = "bidirectional", prefix_len=None,
               masked: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Hidden states [T, dim] (the batch moves to the model's device when elsewhere)."""
        dev = self.image_in.weight.device
        if batch.ids.device != dev:
            batch = batch.to(dev)
        feats = self.input_features(batch, masked)
        if self.codes_as_features:
            batch, feats = self._code_features(batch, feats)
        return self.trunk(batch, mask, prefix_len, features=feats)

    @property
    def codes_as_features(self) -> bool:
        return self.cfg.image_code_input == "features" and self.cfg.image_code_offset >= 0

    def _code_features(self, batch: PackedBatch, feats: torch.Tensor | None):
        """VQ code ids -> their code vectors through the image input projection + LayerNorm
        (marked as feature positions, id -1), so that documents of codes and images given
        as latents reach the trunk the same way."""
        lo = self.cfg.image_code_offset
        is_code = (batch.ids >= lo) & (batch.ids < lo + self.cfg.image_codes)
        if not bool(is_code.any()):
            return batch, feats
        pos = is_code.nonzero(as_tuple=True)[0]
        v = self.codebook[batch.ids[pos] - lo].to(self.image_in.weight.dtype)
        e = self.input_norm["image"](self.image_in(v))
        if feats is None:
            feats = torch.zeros(batch.num_tokens, self.cfg.trunk.dim, device=e.device,
                                dtype=e.dtype)
        feats = feats.index_copy(0, pos, e.to(feats.dtype))
        return replace(batch, ids=batch.ids.masked_fill(is_code, -1)), feats

    # -- heads -------------------------------------------------------------------------------
    def pooled(self, hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """UNITER pooler on each sample's first position: [B, dim]."""
        first = batch.cu_seqlens[:-1].long().to(hidden.device)
        return torch.tanh(self.pooler(hidden[first]))

    def vocab_logits(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.trunk.mlm_logits(hidden, positions)

    def mrfr_features(self, h: torch.Tensor) -> torch.Tensor:
        return self.mrfr(h) @ self.image_in.weight + self.mrfr_bias

    def mrc_logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mrc(h), dim=-1) @ self.codebook.T / self.cfg.mrc_temperature

    @torch.no_grad()
    def init_from_tokenizers(self, codebook: torch.Tensor, vocab, features_are_latents: bool,
                             unit_centroids: torch.Tensor | None = None, seed: int = 0) -> None:
        """Start from what the tokenizers know: the VQ codebook (the MRC classifier; image-code
        embeddings = the code vectors through one random isometry, scaled to the embedding
        init; the image input projection through the same isometry when the features are
        the VQ latents) and the k-means speech centroids (unit embeddings). Similar codes
        then start with similar embeddings and logits."""
        g = torch.Generator().manual_seed(seed)
        d = self.cfg.trunk.dim
        q = _isometry(codebook.shape[1], d, g).T  # [d, code_dim]
        self.codebook.copy_(F.normalize(codebook, dim=-1))
        lo, hi = vocab.ranges()["image"]
        self.trunk.tok.weight[lo:hi] = self.codebook @ q.T * (0.02 * math.sqrt(d))
        if features_are_latents:
            self.image_in.weight.copy_(q)
        if unit_centroids is not None:
            c = F.normalize(unit_centroids.float(), dim=-1)
            self.unit_embed.copy_(c @ _isometry(c.shape[1], self.cfg.unit_dim, g))

    def unit_logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.unit_proj(h), dim=-1) @ F.normalize(
            self.unit_embed, dim=-1).T / self.cfg.unit_temperature
