"""Retrieval head (UNITER / ALBEF): ITC dual-encoder scores over the whole gallery, then ITM
re-ranking of each query's top ``rerank_k``; text -> image, image -> text and spoken
caption -> image (the speech frames through the same trunk).

Each side is encoded alone, as the pretraining ITC head does (``train/objectives/itc.py``):
a caption as ``<cls>`` + text, an image as ``<cls>`` + image, a spoken caption as
``<cls>`` + its frames; the sample's mean state goes through the modality's projection
(after BatchNorm when ``model.itc_batchnorm``) and is l2-normalised; scores are cosines.
ITM reads a packed pair (the query side, then the image) through the pooled ``<cls>``
(``features="cls"``) or with InferSent's pair features (``"pair"``, ``matching.py``).

Training (``forward``): symmetric InfoNCE of captions vs images (``itc``) and of spoken
captions vs images (``s2i``, when the batch has speech) with one learnable temperature,
plus ITM cross-entropy on the positive pairs and, per caption and per image, a hard
negative drawn as ALBEF does (multinomial over the softmax of the scaled ITC similarity,
never a matching pair). ``loss = itc + speech_weight * s2i + itm_weight * itm``.

Parameter names follow the pretraining heads: ``norm.*``, ``text``, ``image`` and
``logit_scale`` are the ITC head's, ``itm`` is the ITM head's ``fc``, so a pretrained
model's ITC/ITM heads start the retrieval head (``init_from_pretraining``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from omnimask.config import check_choice, check_fields
from omnimask.errors import ConfigError, OmnimaskError
from omnimask.fusion.packing import Segment, pack
from omnimask.model import init_linear
from omnimask.registry import HEADS

from .matching import info_nce, pair_features, position_means

SIDES = ("text", "image", "speech")


@dataclass
class RetrievalHeadConfig:
    rerank_k: int = 16  # each query's top-k by ITC re-scored by ITM (0: ITC only)
    itm_weight: float = 1.0
    speech_weight: float = 1.0  # the spoken-caption InfoNCE's weight in the loss
    hard_negatives: bool = True  # ITM negatives drawn by ITC similarity (else uniformly)
    speech_itm: bool = True  # ITM also trained (and re-ranking) on spoken caption-image pairs
    features: str = "pair"  # ITM input: "cls" (UNITER) or "pair" (+ u*v, |u-v|)
    batch_size: int = 64  # samples (or pairs) per trunk call at inference

    def __post_init__(self) -> None:
        p = "heads.retrieval."
        check_fields(self, ">=0", "rerank_k", "itm_weight", "speech_weight", prefix=p)
        check_fields(self, ">=1", "batch_size", prefix=p)
        check_choice(self, "features", ("cls", "pair"), prefix=p)
        if self.rerank_k and not self.itm_weight:
            raise ValueError(f"{p}rerank_k re-ranks by ITM, which {p}itm_weight=0 leaves "
                             f"untrained: set {p}rerank_k=0 too")


@HEADS.register("retrieval")
class RetrievalHead(nn.Module):
    Config = RetrievalHeadConfig

    def __init__(self, model_cfg, cfg: RetrievalHeadConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or RetrievalHeadConfig()
        d = model_cfg.trunk.dim
        self.norm = nn.ModuleDict({m: nn.BatchNorm1d(d, affine=False)
                                   if model_cfg.itc_batchnorm else nn.Identity() for m in SIDES})
        self.text = nn.Linear(d, model_cfg.itc_dim, bias=False)
        self.image = nn.Linear(d, model_cfg.itc_dim, bias=False)
        self.speech = nn.Linear(d, model_cfg.itc_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / model_cfg.itc_temperature)))
        self.itm = nn.Linear(d if self.cfg.features == "cls" else 3 * d, 2)
        init_linear(self.text, self.image, self.speech, self.itm)

    # -- starting from pretraining -----------------------------------------------------------
    @torch.no_grad()
    def init_from_pretraining(self, itc_state: Mapping[str, torch.Tensor],
                              itm_state: Mapping[str, torch.Tensor] | None = None) -> list[str]:
        """Copy a pretraining model's ITC head (``heads.itc.*`` without the prefix) and ITM
        head (``heads.itm.*``) in; returns the keys set. Afterwards text and image ITC
        scores equal the ITC head's and ITM logits the ITM head's; the speech projection
        keeps its own initialisation (pretraining has no spoken-caption contrast). A
        ``cls`` ITM head starts a ``pair`` one exactly: the pair features' weights are 0."""
        own = self.state_dict()
        bad = [k for k in itc_state if k not in own or own[k].shape != itc_state[k].shape]
        missing = [k for k in ("text.weight", "image.weight", "logit_scale")
                   if k not in itc_state]
        if bad or missing:
            raise OmnimaskError(f"the pretraining itc head does not fit the retrieval head: "
                                f"unknown or differently shaped {bad[:5]}, missing {missing}")
        self.load_state_dict(dict(itc_state), strict=False)
        done = sorted(itc_state)
        if itm_state is not None:
            w, b = itm_state.get("fc.weight"), itm_state.get("fc.bias")
            if w is None or b is None or w.shape[0] != 2 or b.shape != (2,):
                raise OmnimaskError(f"the pretraining itm head has no Linear(H, 2) 'fc' "
                                    f"(keys {sorted(itm_state)[:5]})")
            have, want = w.shape[1], self.itm.weight.shape[1]
            if have == want:
                self.itm.weight.copy_(w)
            elif 3 * have == want:  # cls -> pair: the extra features start switched off
                self.itm.weight.zero_()
                self.itm.weight[:, :have] = w
            else:
                raise ConfigError(f"heads.retrieval.features={self.cfg.features!r} cannot start "
                                  f"from the pretraining itm head (input {have}, needs "
                                  f"{want}): set heads.retrieval.features=pair")
            self.itm.bias.copy_(b)
            done += ["itm.weight", "itm.bias"]
        return done

    def init_from_directory(self, directory: str | Path) -> list[str]:
        """``init_from_pretraining`` with the ``itc`` and ``itm`` heads of a model directory's
        weights; [] when it has no ITC head (nothing changed)."""
        from omnimask.pretrained import WEIGHTS, _read_weights

        p = Path(directory) / WEIGHTS
        if not p.is_file():
            raise OmnimaskError(f"{p} is missing: {directory} is not a model directory")
        sd = _read_weights(p)

        def part(name: str) -> dict[str, torch.Tensor] | None:
            pre = f"heads.{name}."
            got = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
            return got or None

        itc = part("itc")
        return self.init_from_pretraining(itc, part("itm")) if itc else []

    # -- embeddings --------------------------------------------------------------------------
    def project(self, pooled: torch.Tensor, side: str) -> torch.Tensor:
        """Mean states [N, dim] of ``side`` samples -> l2-normalised embeddings [N, itc_dim]."""
        return F.normalize(getattr(self, side)(self.norm[side](pooled)), dim=-1)

    def embed(self, encoder, samples: list[list[Segment]], side: str) -> torch.Tensor:
        """[N, itc_dim] embeddings of packed ``samples`` of one side, ``batch_size`` at a
        time (gradients flow; wrap in ``torch.no_grad()`` for inference)."""
        if not samples:
            return torch.zeros(0, self.text.out_features, device=encoder.device)
        n = self.cfg.batch_size
        out = []
        for s in range(0, len(samples), n):
            p = pack(samples[s:s + n])
            out.append(self.project(position_means(encoder(p), p), side))
        return torch.cat(out)

    def embed_texts(self, encoder, texts: Sequence, cls: int | None = None) -> torch.Tensor:
        """Captions: text ``Segment``s that start with ``<cls>`` (as ``text_segment`` builds
        them), or id lists (``cls`` then prepended)."""
        return self.embed(encoder, [[text_item(x, cls)] for x in texts], "text")

    def embed_images(self, encoder, images: Sequence, cls: int) -> torch.Tensor:
        """Images: image ``Segment``s, uint8 pixels [3, S, S] or feature rows [P, d]."""
        return self.embed(encoder, [side_sample(encoder, x, "image", cls) for x in images],
                          "image")

    def embed_speech(self, encoder, frames: Sequence, cls: int) -> torch.Tensor:
        """Spoken captions: speech ``Segment``s or frame rows [n, frame_dim]."""
        return self.embed(encoder, [side_sample(encoder, x, "speech", cls) for x in frames],
                          "speech")

    # -- ITM ---------------------------------------------------------------------------------
    def itm_logits(self, encoder, pairs: list[list[Segment]]) -> torch.Tensor:
        """[B, 2] (no match, match) of packed pairs (query-side segments, then the image)."""
        p = pack(pairs)
        return self.itm(pair_features(encoder, encoder(p), p, self.cfg.features))

    def itm_margin(self, encoder, pairs: list[list[Segment]]) -> torch.Tensor:
        """[B] match minus no-match logit, ``batch_size`` pairs per trunk call."""
        n = self.cfg.batch_size
        out = [self.itm_logits(encoder, pairs[s:s + n]).float() for s in range(0, len(pairs), n)]
        return (torch.cat(out) if out else torch.zeros(0, 2)).diff(dim=-1)[:, 0]

    # -- training ----------------------------------------------------------------------------
    def forward(self, encoder, b: dict) -> dict:
        """``b``: ``packed`` (the ITC samples: ``n`` captions, ``n`` images, then ``n`` spoken
        captions when ``speech``), ``text``/``image``/``speech`` (the query segments of each
        sample: ITM's pairs), ``match`` [n, n] and ``speech_match`` (caption / spoken caption
        i is one of image j's captions), ``seed`` (negative sampling)."""
        p, n = b["packed"], b["n"]
        speech = b.get("speech") is not None
        pooled = position_means(encoder(p), p)
        t, v = self.project(pooled[:n], "text"), self.project(pooled[n:2 * n], "image")
        itc = info_nce(t.float(), v.float(), self.logit_scale)
        loss, out = itc, {"itc": itc.detach()}
        with torch.no_grad():
            sim = (t @ v.T).float()
            out["itc_acc"] = (sim.argmax(-1) == torch.arange(n, device=sim.device)).float().mean()
        g = torch.Generator().manual_seed(int(b["seed"]))
        pairs, labels = self._pairs(sim, b["match"], b["text"], b["image"], g)
        if speech:
            s = self.project(pooled[2 * n:3 * n], "speech")
            s2i = info_nce(s.float(), v.float(), self.logit_scale)
            loss = loss + self.cfg.speech_weight * s2i
            out["s2i"] = s2i.detach()
            if self.cfg.speech_itm:
                with torch.no_grad():
                    ssim = (s @ v.T).float()
                sp, sl = self._pairs(ssim, b["speech_match"], b["speech"], b["image"], g)
                pairs, labels = pairs + sp, labels + sl
        tokens = p.num_tokens
        if self.cfg.itm_weight > 0:  # itm_weight=0: ITC alone, no pairs through the trunk
            logits = self.itm_logits(encoder, pairs).float()
            target = torch.tensor(labels, device=logits.device)
            itm = F.cross_entropy(logits, target)
            loss = loss + self.cfg.itm_weight * itm
            out["itm_acc"] = (logits.argmax(-1) == target).float().mean()
            tokens += sum(len(s) for pair in pairs for s in pair)
        else:
            itm = torch.zeros((), device=loss.device)
        return {"loss": loss, "retrieval": loss.detach(), **out, "itm": itm.detach(),
                "temperature": 1 / self.logit_scale.detach().exp(), "tokens": tokens}

    def _pairs(self, sim: torch.Tensor, match: torch.Tensor, queries: list[list[Segment]],
               images: list[Segment], g: torch.Generator) -> tuple[list, list[int]]:
        """ITM pairs with labels: every (query i, image i), a negative image per query and
        a negative query per image (where one exists)."""
        scale = float(self.logit_scale.detach().exp().clamp(max=100.0))
        allowed = ~match.to(sim.device)
        neg_image = sample_negatives(scale * sim, allowed, g, self.cfg.hard_negatives)
        neg_query = sample_negatives(scale * sim.T, allowed.T, g, self.cfg.hard_negatives)
        pairs = [[*q, im] for q, im in zip(queries, images)]
        labels = [1] * len(pairs)
        for i, j in enumerate(neg_image.tolist()):
            if j >= 0:
                pairs.append([*queries[i], images[j]])
                labels.append(0)
        for j, i in enumerate(neg_query.tolist()):
            if i >= 0:
                pairs.append([*queries[i], images[j]])
                labels.append(0)
        return pairs, labels

    # -- inference ---------------------------------------------------------------------------
    @torch.no_grad()
    def rerank(self, encoder, scores: torch.Tensor, queries: list[list[Segment]],
               gallery: list[list[Segment]], k: int | None = None,
               query_is_image: bool = False) -> torch.Tensor:
        """``scores`` [Q, G] (ITC) with each row's top ``k`` (default ``rerank_k``) replaced
        by ITM margin + ITC (ALBEF's sum) plus an offset that puts every re-scored entry
        above every other one: only the order of the top k changes. ``queries`` and
        ``gallery`` are each item's segments (an image's is one segment; a caption's or a
        spoken caption's its ITM query segments); ``query_is_image``: image -> text."""
        k = min(self.cfg.rerank_k if k is None else k, scores.shape[1])
        out = scores.detach().float().cpu().clone()
        if k <= 0 or out.numel() == 0:
            return out
        if not self.cfg.itm_weight:
            raise OmnimaskError(f"re-ranking the top {k} needs the ITM head, which this model "
                                "did not train (heads.retrieval.itm_weight=0): rank with k=0")
        top = out.topk(k, dim=1).indices
        pairs = []
        for q, cols in enumerate(top.tolist()):
            for c in cols:
                text, image = (gallery[c], queries[q]) if query_is_image else (queries[q],
                                                                               gallery[c])
                pairs.append([*text, *image])
        new = self.itm_margin(encoder, pairs).cpu().view(len(top), k) + out.gather(1, top)
        offset = out.max() - new.min() + 1.0  # re-scored entries above all the others
        return out.scatter(1, top, new + offset.clamp(min=0.0))


def sample_negatives(logits: torch.Tensor, allowed: torch.Tensor, g: torch.Generator,
                     hard: bool = True) -> torch.Tensor:
    """[R] one column per row of ``logits`` [R, C] among the ``allowed`` ones (bool [R, C]),
    drawn by ``softmax(logits)`` (ALBEF's hard negatives; + 1e-5 so that every allowed
    column can be drawn) or uniformly (``hard=False``); -1 for a row with none allowed."""
    w = logits.float().softmax(-1) + 1e-5 if hard else torch.ones_like(logits, dtype=torch.float)
    w = (w * allowed.to(w.dtype)).cpu()
    out = torch.full((len(w),), -1, dtype=torch.long)
    has = w.sum(-1) > 0
    if bool(has.any()):
        out[has] = torch.multinomial(w[has], 1, generator=g)[:, 0]
    return out


def text_item(x, cls: int | None = None) -> Segment:
    """A caption as a text ``Segment`` starting with ``<cls>``: given as one, or as ids."""
    if isinstance(x, Segment):
        if x.modality != "text":
            raise OmnimaskError(f"a caption must be a text segment, got {x.modality}")
        return x
    if cls is None:
        raise OmnimaskError("captions given as ids need the <cls> id (cls=...)")
    return Segment("text", ids=torch.cat([torch.tensor([cls]),
                                          torch.as_tensor(x, dtype=torch.long)]))


def side_segment(encoder, x, side: str) -> Segment:
    """An image or spoken caption as its ``Segment``: given as one, as uint8 pixels
    [3, S, S] (a model reading pixels), or as feature rows [n, d] (VQ latents, frames)."""
    if isinstance(x, Segment):
        if x.modality != side:
            raise OmnimaskError(f"expected a {side} segment, got {x.modality}")
        return x
    x = torch.as_tensor(x)
    if side == "image" and encoder.pixels:
        if x.dtype != torch.uint8 or x.ndim != 3:
            raise OmnimaskError(f"this model reads images as uint8 pixels [3, S, S], got "
                                f"{x.dtype} {tuple(x.shape)}")
        g = encoder.cfg.image_encoder.grid
        return Segment("image", pixels=x, grid=(g, g))
    if x.ndim != 2:
        raise OmnimaskError(f"{side} features must be [n, d], got {tuple(x.shape)}")
    if side == "image":
        r = math.isqrt(len(x))
        if r * r != len(x):
            raise OmnimaskError(f"{len(x)} image feature rows do not make a square grid")
        return Segment("image", features=x.float(), grid=(r, r))
    return Segment("speech", features=x.float())


def side_sample(encoder, x, side: str, cls: int) -> list[Segment]:
    """``<cls>`` + the image or spoken caption: the sample the ITC side encodes."""
    return [Segment("text", ids=torch.tensor([cls])), side_segment(encoder, x, side)]


@torch.no_grad()
def rank(model, queries: Sequence, gallery: Sequence, k: int | None = None,
         cls: int | None = None, query_side: str | None = None) -> torch.Tensor:
    """[Q, G] scores of every gallery item for every query: ITC cosines, each row's top
    ``k`` (default: the head's ``rerank_k``) re-ranked by ITM above the rest.

    Text -> image: ``queries`` captions (text segments or id lists), ``gallery`` images
    (segments, pixels or features); spoken caption -> image: ``queries`` speech frames
    [n, frame_dim] or segments (``query_side="speech"`` when not segments); image -> text:
    ``queries`` images and ``gallery`` captions (``query_side="image"`` when not segments).
    ``cls``: the ``<cls>`` id (default: ``model.vocab``'s)."""
    head, enc = model.heads["retrieval"], model.encoder
    if cls is None:
        if model.vocab is None:
            raise OmnimaskError("rank: the model has no vocabulary; give cls=<the <cls> id>")
        cls = model.vocab.special("cls")
    side = query_side or _side_of(queries)
    if side not in SIDES:
        raise OmnimaskError(f"rank: query_side must be one of {', '.join(SIDES)}, got {side!r}")
    if side == "image":
        img = [side_segment(enc, x, "image") for x in queries]
        txt = [text_item(x, cls) for x in gallery]
        scores = head.embed_images(enc, img, cls) @ head.embed_texts(enc, txt).T
        return head.rerank(enc, scores, [[s] for s in img], [[s] for s in txt], k,
                           query_is_image=True)
    img = [side_segment(enc, x, "image") for x in gallery]
    if side == "text":
        q = [[text_item(x, cls)] for x in queries]
        emb = head.embed_texts(enc, [s[0] for s in q])
    else:
        q = [side_sample(enc, x, "speech", cls) for x in queries]
        emb = head.embed_speech(enc, [s[1] for s in q], cls)
    scores = emb @ head.embed_images(enc, img, cls).T
    if side == "speech" and not head.cfg.speech_itm:
        k = 0  # an ITM never trained on speech would only scramble the ITC order
    return head.rerank(enc, scores, q, [[s] for s in img], k)


def _side_of(items: Sequence) -> str:
    first = next(iter(items), None)
    if isinstance(first, Segment):
        return first.modality
    if isinstance(first, torch.Tensor) and first.dtype == torch.uint8:
        return "image"
    return "text"
