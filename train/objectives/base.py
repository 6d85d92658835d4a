"""What every objective shares: its settings, the context it reads, and sample builders.

An objective is a class registered in ``OBJECTIVES`` (with :func:`objective`) that has a
``head`` (an ``nn.Module`` class: ``head(model_cfg, head_cfg)``, ``forward(encoder, batch)
-> dict``; parameter-free where the encoder's vocabulary head does the work) and:
``batch(corpus, indices, gen) -> dict`` (the data side: which positions are masked or
corrupted, packed into a :class:`PackedBatch`; all randomness from ``gen``);
``inputs(model, batch)`` (what the head gets; the batch itself unless pairs are drawn with
the model, as ITM's hard negatives); ``loss(model, batch) = model(inputs, task=name)``
(``"loss"`` is what is optimised; the objective's own name keys its main loss, the one
validation tracks; other keys are logged). Going through ``model(...)`` keeps every
objective on the model's one ``forward``, which DDP/FSDP wrap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from omnimask.config import check_choice, check_fields
from omnimask.errors import OmnimaskError
from omnimask.fusion.packing import IGNORE, Segment
from omnimask.modalities.vocab import Vocab
from omnimask.registry import Registry

OBJECTIVES: Registry = Registry("objective", ("omnimask.train.objectives.uniter",
                                              "omnimask.train.objectives.itc",
                                              "omnimask.train.objectives.cm3_lm",
                                              "omnimask.train.objectives.maskgit",
                                              "omnimask.train.objectives.speech_units"))


@dataclass
class ObjectivesConfig:
    """Settings of every objective; defaults follow the papers (UNITER, BEiT, CM3, HuBERT)."""

    mix: dict[str, float] = field(default_factory=lambda: {
        "mlm": 2.0, "itm": 2.0, "mrfr": 1.0, "mrc": 1.0, "mim": 1.0, "itc": 1.0, "cm3": 3.0,
        "speech": 1.0})
    # ratios at step 0, moving linearly to ``mix`` over ``mix_ramp_steps`` (a schedule in the
    # spirit of ALBEF's align-before-fuse: contrastive/matching first); {}: ``mix`` throughout
    mix_start: dict[str, float] = field(default_factory=dict)
    mix_ramp_steps: int = 0
    mlm_prob: float = 0.15
    mlm_max_ngram: int = 1  # > 1: ERNIE-Gram n-gram masking
    mlm_whole_word: bool = False
    mrm_prob: float = 0.15  # UNITER: each region masked with p=0.15, at least one
    mrc_temperature: float = 0.1  # soft target: softmax(cos(latent, codes) / t)
    mim_ratio: float = 0.4  # BEiT blockwise masking
    mim_min_block: int = 4
    itm_neg_prob: float = 0.5
    itm_features: str = "cls"  # the ITM head's input: "cls" (UNITER) or "pair" (+ u*v, |u-v|)
    itm_hard_negatives: bool = False  # negatives sampled by ITC similarity (ALBEF style)
    wra_weight: float = 0.1
    ot_beta: float = 0.5
    ot_iterations: int = 50
    cm3_max_spans: int = 16
    cm3_poisson: float = 1.0
    cm3_image_first: float = 0.5  # probability that a document puts the image before the text
    cm3_speech: float = 0.0  # probability that a document also holds the spoken caption's units
    maskgit_uncond: float = 0.1  # MaskGIT samples without their caption (guidance's baseline)
    # loss weight of the masked codes whose patch holds object pixels (seg.png), against 1
    # for the background's: the caption decides the objects, not the background
    maskgit_object_weight: float = 1.0
    # share of MaskGIT samples that mask every object code (plus the ratio's random share):
    # the objects must then come from the caption, not from the rest of the image
    maskgit_object_mask: float = 0.0
    # what those samples mask: the object ``codes`` (their outline shows in the mask) or
    # ``boxes``, each object's bounding box one code wider (where, not which shape: what
    # ``eval generate --set infill=objects`` draws)
    maskgit_object_mask_region: str = "codes"
    # span starts per frame, spans of speech_span frames (overlapping): wav2vec2's mask_prob
    # 0.65 / length 10, ~50% of the frames covered (HuBERT's 0.08 covers ~57%)
    speech_start_prob: float = 0.065
    speech_span: int = 10
    speech_with_text: float = 0.5  # probability of conditioning on the caption (cross-modal)
    speech_max_units: int = 0  # > 0: a random crop of at most this many frames (HuBERT crops)

    def __post_init__(self) -> None:
        p = "objectives."
        check_fields(self, "(0,1)", "mlm_prob", "mim_ratio", prefix=p)
        check_fields(self, "(0,1]", "mrm_prob", "speech_start_prob", prefix=p)
        check_fields(self, "[0,1]", "itm_neg_prob", "cm3_image_first", "cm3_speech",
                     "maskgit_uncond", "maskgit_object_mask", "speech_with_text", prefix=p)
        check_fields(self, ">=1", "mlm_max_ngram", "mim_min_block", "ot_iterations",
                     "cm3_max_spans", "speech_span", prefix=p)
        check_fields(self, ">0", "mrc_temperature", "ot_beta", "cm3_poisson",
                     "maskgit_object_weight", prefix=p)
        check_fields(self, ">=0", "mix_ramp_steps", "wra_weight", "speech_max_units", prefix=p)
        check_choice(self, "itm_features", ("cls", "pair"), prefix=p)
        check_choice(self, "maskgit_object_mask_region", ("codes", "boxes"), prefix=p)
        for key in ("mix", "mix_start"):
            for name, v in getattr(self, key).items():
                if not float(v) >= 0:
                    raise ValueError(f"{p}{key}.{name} must be >= 0, got {v}")


def objective(name: str):
    """Register an objective class under ``name`` (also its ``name`` and head's task)."""
    def deco(cls):
        cls.name = name
        return OBJECTIVES.register(name)(cls)
    return deco


class Objective:
    """Defaults shared by every objective (see the module docstring)."""

    name = ""
    head: type[torch.nn.Module]

    def __init__(self, ctx: Context) -> None:
        self.ctx, self.cfg = ctx, ctx.cfg

    @classmethod
    def head_config(cls, cfg: ObjectivesConfig):
        """The head's settings taken from the objectives' config (None: it has none)."""
        return None

    def inputs(self, model, batch: dict) -> dict:
        return batch

    def loss(self, model, batch: dict) -> dict:
        return model(self.inputs(model, batch), task=self.name)


def pretraining_heads(cfg: ObjectivesConfig) -> dict:
    """Every pretraining objective's head name -> settings: the heads a pretraining model
    carries (all of them, whatever the mix: checkpoints keep one layout)."""
    return {n: OBJECTIVES.get(n).head_config(cfg) for n in OBJECTIVES.names()}


@dataclass
class Context:
    vocab: Vocab
    codebook: torch.Tensor  # [K, code_dim], l2-normalised VQ codes (MRC soft targets)
    word_start: torch.Tensor  # [text_size] bool, token begins a word (whole-word masking)
    cfg: ObjectivesConfig
    pixels: bool = False  # images enter as uint8 pixels (model.image_input=pixels)
    depth: int = 1  # image code ids per grid position (an rq tokenizer's levels)

    def sp(self, role: str) -> int:
        return self.vocab.special(role)

    def level_size(self) -> int:
        """Vocabulary rows of one level of the image codes."""
        lo, hi = self.vocab.ranges()["image"]
        return (hi - lo) // self.depth


def stack_ids(ctx: Context, codes: torch.Tensor) -> torch.Tensor:
    """Codes [..., P * depth] (each level's own ids, depth innermost; ``ctx.depth``) ->
    vocabulary ids [..., P, depth]: level k's code c is at row k * ``level_size()`` + c."""
    lo, depth = ctx.vocab.ranges()["image"][0], ctx.depth
    levels = torch.arange(depth, device=codes.device) * ctx.level_size() + lo
    return codes.long().unflatten(-1, (-1, depth)) + levels


class TokenPrediction(nn.Module):
    """A head without parameters: cross-entropy of the encoder's vocabulary logits (the
    trunk's head, tied to the token embeddings) at the predicted positions, or its mean
    weighted by the batch's ``weights`` (one per target) when it has them. ``task`` keys
    the loss; ``mask`` is the attention mask the encoder runs with."""

    task, mask = "", "bidirectional"

    def __init__(self, model_cfg=None, cfg=None) -> None:
        super().__init__()

    def targets(self, b: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions, target ids); default: the packed batch's own targets."""
        p = b["packed"]
        pos = p.target_positions
        return pos, p.targets[pos]

    def forward(self, encoder, b: dict) -> dict:
        p = b["packed"]
        pos, target = self.targets(b)
        h = encoder(p, mask=self.mask, masked=b.get("masked"), outputs=pos,
                    stack=b.get("stack"))  # [P, dim]
        logits = encoder.vocab_logits(h, torch.arange(len(h), device=h.device)).float()
        w = b.get("weights")
        if w is None:
            loss = F.cross_entropy(logits, target.to(h.device))
        else:
            w = w.to(h.device)
            loss = (F.cross_entropy(logits, target.to(h.device), reduction="none") * w).sum() / w.sum()
        return {"loss": loss, self.task: loss.detach(), "tokens": p.num_tokens}


def hidden_at_masked(encoder, b: dict, modality: str) -> torch.Tensor:
    """Hidden states at the masked ``modality`` feature positions of ``b``."""
    p, m = b["packed"], b["masked"]
    return encoder(p, masked=m, outputs=p.feature_index[modality][m[modality]])


def pick_caption(corpus, i: int, gen: torch.Generator) -> list[int]:
    caps = corpus.captions[i]
    return caps[int(torch.randint(len(caps), (1,), generator=gen))]


def text_segment(ctx: Context, ids: list[int] | torch.Tensor, targets=None) -> Segment:
    """``<cls>`` + caption ids, as UNITER's text input (the pooler reads the ``<cls>``)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    full = torch.cat([torch.tensor([ctx.sp("cls")]), ids])
    tgt = None
    if targets is not None:
        tgt = torch.cat([torch.tensor([IGNORE]), torch.as_tensor(targets, dtype=torch.long)])
    return Segment("text", ids=full, targets=tgt)


def image_segment(corpus, i: int, pixels: bool = False) -> Segment:
    """Image ``i`` as its feature rows, or (``pixels``) as its uint8 pixels."""
    if not pixels:
        return Segment("image", features=corpus.features[i].float(), grid=corpus.grid)
    if corpus.pixels is None:
        raise OmnimaskError("model.image_input=pixels but the corpus keeps no pixels")
    return Segment("image", pixels=corpus.pixels[i], grid=corpus.grid)


def masked_by_modality(masks: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-sample feature masks concatenated in packing order (one tensor per modality)."""
    return {m: torch.cat(v) for m, v in masks.items() if v}


def mix_weights(names: list[str], cfg: ObjectivesConfig, step: int) -> torch.Tensor:
    """[len(names)] sampling ratios at ``step``: ``mix_start`` moving linearly to ``mix``
    over ``mix_ramp_steps`` (a function of the step only: every rank and a resumed run
    draw the same objective)."""
    end = torch.tensor([float(cfg.mix.get(n, 0.0)) for n in names])
    if not cfg.mix_start or cfg.mix_ramp_steps <= 0:
        return end
    start = torch.tensor([float(cfg.mix_start.get(n, 0.0)) for n in names])
    t = min(1.0, step / cfg.mix_ramp_steps)
    return start + t * (end - start)
