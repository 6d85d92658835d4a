"""Prompted segmentation head (SEEM / X-Decoder, on Mask2Former's decoder): one decoder for
semantic and panoptic masks, referring expressions and clicks or boxes on an object.

- **Pixel decoder**: a small FPN from the trunk's fused image tokens (coarsest) down the
  pixel encoder's feature maps (``Encoder(..., maps=)``); its finest output is the
  per-pixel mask embedding, its levels (coarse to fine) the decoder's memory, each with a
  2-D sine position and a level embedding.
- **Queries**: ``queries`` learnable object queries, plus visual prompt queries per image:
  clicks (mask features sampled at each click, a positive or negative embedding, the
  click's sine position; positive and negative clicks averaged apart) and boxes (mask
  features pooled inside the box, the box's corners).
- **Referring expressions** select an object query (X-Decoder's grounding): the
  expression's fused ``<cls>`` state (the trunk reads it with the image) and each object
  query are projected into a grounding space of their own, and the query with the highest
  scaled cosine gives the mask; trained by cross-entropy towards the query matched to the
  referred object; the queries enter detached, so grounding does not pull them away from
  segmentation (docs/experiments/2026-11-29-segmentation.md).
- **Layers** (Mask2Former's order, post-norm): masked cross-attention to one level (cycling
  coarse to fine; a query sees only where its previous mask is above 0.5, a row with
  nothing left sees everything), self-attention (object queries see object queries; a
  prompt query sees them and itself, so prompts never change the object answers), FFN.
- **Outputs**, after the query init and after every layer (deep supervision): masks =
  ``MLP(q) . mask embedding``; classes = ``exp(logit_scale) * cos(W q, e)`` with ``e`` the
  trunk's pooled embeddings of the class names and a learned no-object row (open
  vocabulary: a new name is a new row).
- **Loss**: object queries matched to the image's segments (instances and stuff) by
  Hungarian matching on class, BCE and dice costs; class CE with no-object weight 0.1,
  point-sampled BCE and dice (``segment_losses``); visual prompt queries matched to their
  target directly (mask losses only); expressions by their grounding cross-entropy (class
  weight). Weights class / BCE / dice = 2 / 5 / 5.

Batch (``train/tasks/segment.py`` builds it): ``packed`` samples ``[image][<cls>
expression]...`` as blocks (``blocks``, the image encoded once), ``classes`` the packed
class names, ``prompts`` (one dict per prompt: ``image``, ``kind`` text | point | box and
its ``cls`` position, ``clicks`` [n, 3] (x, y in [0, 1], positive) or ``box`` [4]), and for
training ``targets`` (per image ``labels`` [T] and ``masks`` [T, S, S]), ``prompt_masks``
(one [S, S] mask per prompt) and, on each text prompt, ``target``: the index of its object
in its image's targets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from omnimask.config import check_choice, check_fields
from omnimask.errors import OmnimaskError
from omnimask.model import init_linear
from omnimask.registry import HEADS

from .segment_losses import mask_losses, match, point_sample

KINDS = ("text", "point", "box")
VISUAL = ("point", "box")  # prompts that become decoder queries


@dataclass
class SegmentHeadConfig:
    class_names: list[str] = field(default_factory=list)  # class id -> name (from the data)
    stuff: list[str] = field(default_factory=lambda: ["background"])  # one segment per image
    # the text each class name is embedded as; "{}" (the name alone, as heads saved before
    # this setting were trained) reads a word-initial BPE token that captions rarely hold,
    # so new heads get "a {}" (``finetune segment``), the name as a sentence holds it
    class_prompt: str = "{}"
    # what of the prompt's trunk states embeds a class: "cls" (the UNITER pooler on <cls>,
    # heads saved before this setting), "mean" (the prompt's tokens) or "last" (its last token)
    class_pool: str = "cls"
    dim: int = 128  # decoder width
    mask_dim: int = 64  # per-pixel mask embedding width (the finest map's resolution)
    queries: int = 8  # object queries
    layers: int = 3  # decoder layers (each reads one level, coarse to fine, cycling)
    heads: int = 4
    ffn_dim: int = 256
    no_object_weight: float = 0.1
    class_weight: float = 2.0
    mask_weight: float = 5.0  # point-sampled BCE
    dice_weight: float = 5.0
    points: int = 256  # points each mask is scored on (matching and loss)
    oversample: float = 3.0  # importance sampling's candidates per point
    importance: float = 0.75  # share of points drawn where the prediction is uncertain
    object_threshold: float = 0.8  # panoptic: queries kept above this class probability
    overlap_threshold: float = 0.8  # panoptic: kept when this much of its mask survives

    def __post_init__(self) -> None:
        p = "heads.segment."
        self.class_names = [str(c) for c in self.class_names]
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"{p}class_names has repeated names")
        check_choice(self, "class_pool", ("cls", "mean", "last"), prefix=p)
        if self.class_prompt.count("{}") != 1:
            raise ValueError(f"{p}class_prompt must hold one {{}} for the class name, got "
                             f"{self.class_prompt!r}")
        check_fields(self, ">=1", "dim", "mask_dim", "queries", "layers", "heads", "ffn_dim",
                     "points", prefix=p)
        check_fields(self, ">=0", "class_weight", "mask_weight", "dice_weight", prefix=p)
        if self.dim % self.heads:
            raise ValueError(f"{p}heads must divide {p}dim, got {self.heads} and {self.dim}")
        for k in ("no_object_weight", "importance", "object_threshold", "overlap_threshold"):
            if not 0.0 <= getattr(self, k) <= 1.0:
                raise ValueError(f"{p}{k} must be in [0, 1], got {getattr(self, k)}")
        if self.oversample < 1:
            raise ValueError(f"{p}oversample must be >= 1, got {self.oversample}")


def sine_position(xy: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """[..., 2] (x, y) in [0, 1] -> [..., dim] sine/cosine features (DETR's, normalised)."""
    k = dim // 4
    freq = 2 * math.pi / temperature ** (torch.arange(k, device=xy.device) / k)
    a = xy[..., :, None].float() * freq  # [..., 2, k]
    pe = torch.cat([a.sin(), a.cos()], -1).flatten(-2)  # [..., 4k]
    return F.pad(pe, (0, dim - pe.shape[-1]))


def grid_xy(h: int, w: int, device=None) -> torch.Tensor:
    """[h * w, 2] pixel-centre (x, y) in [0, 1], raster order."""
    ys = (torch.arange(h, device=device) + 0.5) / h
    xs = (torch.arange(w, device=device) + 0.5) / w
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, q, k, v, allowed: torch.Tensor) -> torch.Tensor:
        """q [B, Q, d], k/v [B, K, d], ``allowed`` [B, Q, K] bool -> [B, Q, d]."""
        b, n, d = q.shape
        h = self.heads

        def split(x):
            return x.view(b, -1, h, d // h).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q(q)), split(self.k(k)), split(self.v(v)),
                                             attn_mask=allowed[:, None])
        return self.o(out.transpose(1, 2).reshape(b, n, d))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: SegmentHeadConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.cross, self.self_attn = Attention(d, cfg.heads), Attention(d, cfg.heads)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(), nn.Linear(cfg.ffn_dim, d))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(3))

    def forward(self, x, pos, memory, memory_pos, cross_allowed, self_allowed):
        x = self.norms[0](x + self.cross(x + pos, memory + memory_pos, memory, cross_allowed))
        x = self.norms[1](x + self.self_attn(x + pos, x + pos, x, self_allowed))
        return self.norms[2](x + self.ffn(x))


def map_layout(enc_cfg) -> tuple[list[int], list[int]]:
    """(channels, strides) of the pixel encoder's maps, finest first (built on the meta
    device: no memory, no init)."""
    from omnimask.modalities.image.encoder import ImageEncoder

    with torch.device("meta"):
        e = ImageEncoder(enc_cfg)
    return list(e.map_channels), list(e.map_strides)


class PixelDecoder(nn.Module):
    """Trunk image tokens + encoder maps -> (levels coarse to fine [B, h*w, dim] with their
    sizes, mask features [B, mask_dim, H, W] at the finest map's resolution)."""

    def __init__(self, model_cfg, cfg: SegmentHeadConfig) -> None:
        super().__init__()
        d, m = cfg.dim, cfg.mask_dim
        channels, _ = map_layout(model_cfg.image_encoder)
        fine = channels[:-1][::-1]  # below the token stage, coarse to fine
        self.top = nn.Linear(model_cfg.trunk.dim, d)
        widths = [d] * len(fine)
        if widths:
            widths[-1] = m  # the finest level is the widest map: kept narrow
        self.lateral = nn.ModuleList(nn.Conv2d(c, w, 1) for c, w in zip(fine, widths))
        self.down = nn.ModuleList(nn.Conv2d(a, b, 1) for a, b in zip([d] + widths[:-1], widths))
        self.out = nn.ModuleList(
            nn.Sequential(nn.Conv2d(w, w, 3, padding=1, bias=False),
                          nn.GroupNorm(math.gcd(8, w), w), nn.GELU()) for w in widths)
        self.to_memory = nn.ModuleList(nn.Linear(w, d) for w in widths)
        self.mask = nn.Conv2d(widths[-1] if widths else d, m, 1)
        self.level_embed = nn.Parameter(torch.zeros(1 + len(widths), d))
        nn.init.normal_(self.level_embed, std=0.02)

    def forward(self, tokens: torch.Tensor, grid: int, maps: list[torch.Tensor]):
        b = tokens.shape[0]
        x = self.top(tokens)  # [B, g*g, d]
        levels = [x]
        y = x.transpose(1, 2).reshape(b, -1, grid, grid)
        for k, fmap in enumerate(maps[:-1][::-1]):
            y = self.lateral[k](fmap.to(y.dtype)) + F.interpolate(
                self.down[k](y), size=fmap.shape[-2:], mode="nearest")
            y = self.out[k](y)
            levels.append(self.to_memory[k](y.flatten(2).transpose(1, 2)))
        return levels, self.mask(y)


@HEADS.register("segment")
class SegmentHead(nn.Module):
    Config = SegmentHeadConfig

    def __init__(self, model_cfg, cfg: SegmentHeadConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or SegmentHeadConfig()
        if model_cfg.image_input != "pixels":
            raise OmnimaskError("the segment head decodes the pixel encoder's feature maps: it "
                                "needs model.image_input=pixels, got "
                                f"{model_cfg.image_input!r}")
        d, m, big = cfg.dim, cfg.mask_dim, model_cfg.trunk.dim
        self.grid = model_cfg.image_encoder.grid
        self.pixel = PixelDecoder(model_cfg, cfg)
        self.query_feat = nn.Parameter(torch.randn(cfg.queries, d) * 0.02)
        self.query_pos = nn.Parameter(torch.randn(cfg.queries, d) * 0.02)
        self.prompt_pos = nn.Parameter(torch.randn(len(VISUAL), d) * 0.02)
        self.click = nn.Linear(m, d)
        self.click_sign = nn.Parameter(torch.randn(2, d) * 0.02)  # negative, positive
        self.box = nn.Linear(4 * m + d, d)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(d)
        self.mask_embed = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d), nn.GELU(),
                                        nn.Linear(d, m))
        self.class_proj = nn.Linear(d, d)
        self.class_text = nn.Linear(big, d)
        # object queries -> the grounding space, on detached queries: grounding reads what the
        # segmentation losses put there and does not pull it elsewhere
        self.ground_query = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        self.ground_text = nn.Linear(big, d)  # expressions -> the grounding space
        self.no_object = nn.Parameter(torch.randn(1, d) * 0.02)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        init_linear(self.click, self.box, self.class_proj, self.class_text, self.ground_query[0],
                    self.ground_query[2], self.ground_text)

    # -- pieces --------------------------------------------------------------------------------
    def class_embeddings(self, encoder, classes) -> torch.Tensor:
        """[K + 1, d] l2-normalised: each packed class name's pooled state, then no-object."""
        h = encoder(classes)
        if self.cfg.class_pool == "cls":
            pooled = encoder.pooled(h, classes)
        else:  # the tokens after <cls>: their mean, or the last one
            cu = classes.cu_seqlens.long().to(h.device)
            if self.cfg.class_pool == "last":
                pooled = h[cu[1:] - 1]
            else:
                sums = torch.zeros(len(cu) - 1, h.shape[-1], dtype=h.dtype, device=h.device)
                rows = torch.repeat_interleave(torch.arange(len(cu) - 1, device=h.device),
                                               cu[1:] - cu[:-1])
                keep = torch.ones(len(h), dtype=torch.bool, device=h.device)
                keep[cu[:-1]] = False
                sums.index_add_(0, rows[keep], h[keep])
                pooled = sums / (cu[1:] - cu[:-1] - 1).clamp_min(1)[:, None].to(h.dtype)
        e = self.class_text(pooled)
        return F.normalize(torch.cat([e, self.no_object.to(e.dtype)]), dim=-1)

    def predict(self, x: torch.Tensor, mask_features: torch.Tensor, classes: torch.Tensor):
        """(class logits [B, Q, K+1], mask logits [B, Q, H, W], grounding embeddings [B, Q, d],
        l2-normalised) of queries ``x``."""
        q = self.norm(x)
        cls = F.normalize(self.class_proj(q), dim=-1) @ classes.T * self.scale()
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(q), mask_features)
        return cls, masks, F.normalize(self.ground_query(q.detach()), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=100.0)

    @staticmethod
    def cross_allowed(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """[B, Q, h*w] bool: where each query's mask, resized to the level, is above 0.5; a
        row with nothing allowed is opened whole (Mask2Former)."""
        m = F.interpolate(masks.detach().float(), size=size, mode="bilinear",
                          align_corners=False)
        allowed = (m.flatten(2).sigmoid() >= 0.5)
        return allowed | ~allowed.any(-1, keepdim=True)

    def prompt_queries(self, prompts: list[dict], mask_features) -> torch.Tensor:
        """[P, d] content of each visual prompt's query (kinds checked by ``decode``)."""
        out = []
        side = mask_features.shape[-1]
        for pr in prompts:
            kind, b = pr["kind"], pr["image"]
            if kind == "point":
                c = pr["clicks"].to(mask_features.device, mask_features.dtype)
                f = point_sample(mask_features[b:b + 1], c[None, :, :2])[0].T  # [n, m]
                tok = self.click(f) + sine_position(c[:, :2], self.cfg.dim).to(f.dtype)
                sign = c[:, 2] > 0.5
                tok = tok + self.click_sign[sign.long()].to(tok.dtype)
                q = tok[sign].mean(0) if sign.any() else tok.new_zeros(tok.shape[1])
                if (~sign).any():
                    q = q + tok[~sign].mean(0)
                out.append(q)
            else:  # box
                from torchvision.ops import roi_align

                box = pr["box"].to(mask_features.device, mask_features.dtype)
                roi = torch.cat([box.new_zeros(1), box * side])[None]
                f = roi_align(mask_features[b:b + 1], roi, 2, aligned=True).flatten()
                corners = sine_position(box.view(2, 2), self.cfg.dim // 2).flatten()
                out.append(self.box(torch.cat([f, corners.to(f.dtype)])))
        if not out:
            return mask_features.new_zeros(0, self.cfg.dim)
        return torch.stack(out)

    # -- forward -------------------------------------------------------------------------------
    def decode(self, encoder, batch: dict) -> dict:
        p = batch["packed"]
        maps: list[torch.Tensor] = []
        if "blocks" in batch:
            h = encoder(p, mask="blocks", prefix_len=batch["blocks"], maps=maps)
        else:
            h = encoder(p, maps=maps)
        if not maps:
            raise OmnimaskError("the segment head needs images given as pixels")
        nb = len(p.cu_seqlens) - 1
        idx = p.feature_index["image"].to(h.device)
        g = self.grid
        if idx.numel() != nb * g * g:
            raise OmnimaskError(f"the segment head needs one {g}x{g} image per sample; got "
                                f"{idx.numel()} image positions in {nb} samples")
        levels, mask_features = self.pixel(h[idx].view(nb, g * g, -1), g, maps)
        sizes = [(g, g)] + [tuple(m.shape[-2:]) for m in maps[:-1][::-1]]
        classes = self.class_embeddings(encoder, batch["classes"]).to(h.dtype)

        prompts = batch.get("prompts", [])
        for pr in prompts:
            if pr["kind"] not in KINDS:
                raise OmnimaskError(f"unknown prompt kind {pr['kind']!r}; known: "
                                    f"{', '.join(KINDS)}")
        visual_at = [k for k, pr in enumerate(prompts) if pr["kind"] in VISUAL]
        text_at = [k for k, pr in enumerate(prompts) if pr["kind"] == "text"]
        visual = [prompts[k] for k in visual_at]
        text = [prompts[k] for k in text_at]
        content = self.prompt_queries(visual, mask_features)
        n, d = self.cfg.queries, self.cfg.dim
        per_image = [0] * nb
        slots = []  # each visual prompt's (image, query slot)
        for pr in visual:
            slots.append((pr["image"], n + per_image[pr["image"]]))
            per_image[pr["image"]] += 1
        bi = torch.tensor([b for b, _ in slots], dtype=torch.long, device=h.device)
        si = torch.tensor([q for _, q in slots], dtype=torch.long, device=h.device)
        expr = None  # [E, d] the expressions in the grounding space
        if text:
            pos = torch.tensor([pr["cls"] for pr in text], device=h.device)
            expr = F.normalize(self.ground_text(encoder.pooled(h, p, pos)), dim=-1)
        qn = n + max(per_image, default=0)
        x = self.query_feat.to(h.dtype).expand(nb, -1, -1)
        pos = self.query_pos.to(h.dtype).expand(nb, -1, -1)
        if qn > n:
            x = torch.cat([x, x.new_zeros(nb, qn - n, d)], 1)
            pos = torch.cat([pos, pos.new_zeros(nb, qn - n, d)], 1)
            if slots:
                kinds = torch.tensor([VISUAL.index(pr["kind"]) for pr in visual],
                                     device=h.device)
                x = x.index_put((bi, si), content)
                pos = pos.index_put((bi, si), self.prompt_pos[kinds].to(h.dtype))
        eye = torch.eye(qn, dtype=torch.bool, device=h.device)
        self_allowed = (eye | (torch.arange(qn, device=h.device) < n)[None, :]).expand(nb, -1, -1)
        memory_pos = [sine_position(grid_xy(*s, device=h.device), d).to(h.dtype) + self.pixel
                      .level_embed[k].to(h.dtype) for k, s in enumerate(sizes)]

        outs = [self.predict(x, mask_features, classes)]
        for k, layer in enumerate(self.layers):
            lv = k % len(levels)
            allowed = self.cross_allowed(outs[-1][1], sizes[lv])
            x = layer(x, pos, levels[lv], memory_pos[lv][None], allowed, self_allowed)
            outs.append(self.predict(x, mask_features, classes))
        return {"outs": outs, "slots": (bi, si), "num_classes": classes.shape[0] - 1,
                "text": text, "expr": expr, "visual_at": visual_at, "text_at": text_at,
                "prompts": prompts}

    def grounding(self, r: dict, e: torch.Tensor) -> torch.Tensor:
        """[E, N] logits of each expression over its image's object queries (query
        embeddings ``e`` [B, Q, d] of one layer)."""
        b = torch.tensor([pr["image"] for pr in r["text"]], device=e.device)
        return (e[b, :self.cfg.queries] * r["expr"][:, None]).sum(-1) * self.scale()

    def forward(self, encoder, batch: dict) -> dict:
        r = self.decode(encoder, batch)
        cls, masks, e = r["outs"][-1]
        n = self.cfg.queries
        out = {"class_logits": cls[:, :n], "masks": masks[:, :n]}
        if r["prompts"]:  # one mask and score per prompt, in the batch's order
            pm, ps = [None] * len(r["prompts"]), [None] * len(r["prompts"])
            bi, si = r["slots"]
            for j, k in enumerate(r["visual_at"]):
                pm[k] = masks[bi[j], si[j]]
                ps[k] = masks.new_ones(())
            if r["text"]:
                prob = self.grounding(r, e).float().softmax(-1)
                best = prob.argmax(-1)
                for j, (k, pr) in enumerate(zip(r["text_at"], r["text"])):
                    pm[k] = masks[pr["image"], best[j]]
                    ps[k] = prob[j, best[j]].to(masks.dtype)
            out["prompt_masks"] = torch.stack(pm)
            out["prompt_scores"] = torch.stack(ps)  # grounding probability (1 for visual)
        if "targets" in batch:
            out |= self.loss(r, batch)
        return out

    # -- loss ----------------------------------------------------------------------------------
    def loss(self, r: dict, batch: dict) -> dict:
        c, n, k = self.cfg, self.cfg.queries, r["num_classes"]
        gen = torch.Generator().manual_seed(int(batch.get("seed", 0)))
        targets = batch["targets"]
        weight = torch.ones(k + 1)
        weight[k] = c.no_object_weight
        num_masks = max(1, sum(len(t["labels"]) for t in targets))
        totals = {"segment_class": 0.0, "segment_bce": 0.0, "segment_dice": 0.0,
                  "prompt_bce": 0.0, "prompt_dice": 0.0, "refer_ce": 0.0}
        pm = batch.get("prompt_masks")
        bi, si = r["slots"]
        if pm is not None and r["visual_at"]:  # the visual prompts' target masks
            pm = pm[r["visual_at"]]
        for cls, masks, e in r["outs"]:
            dev = cls.device
            labels = torch.full((cls.shape[0], n), k, dtype=torch.long, device=dev)
            preds, tgts = [], []
            owner = []  # per image: target index -> its matched query
            for b, t in enumerate(targets):
                rows, cols = match(cls[b, :n], masks[b, :n], t["labels"], t["masks"],
                                   c.points, (c.class_weight, c.mask_weight, c.dice_weight),
                                   gen)
                owner.append(dict(zip(cols.tolist(), rows.tolist())))
                labels[b, rows.to(dev)] = t["labels"][cols].to(dev)
                preds.append(masks[b, rows.to(dev)])
                tgts.append(t["masks"][cols])
            ce = F.cross_entropy(cls[:, :n].float().flatten(0, 1), labels.flatten(),
                                 weight.to(dev))
            bce, dice = mask_losses(torch.cat(preds), torch.cat(tgts).to(dev), num_masks,
                                    c.points, c.oversample, c.importance, gen)
            totals["segment_class"] += ce
            totals["segment_bce"] += bce
            totals["segment_dice"] += dice
            if r["visual_at"] and pm is not None:
                pb, pd = mask_losses(masks[bi, si], pm.to(dev), len(r["visual_at"]), c.points,
                                     c.oversample, c.importance, gen)
                totals["prompt_bce"] += pb
                totals["prompt_dice"] += pd
            if r["text"]:
                want = torch.tensor([owner[pr["image"]].get(pr.get("target", -1), -100)
                                     for pr in r["text"]], device=dev)
                if bool((want >= 0).any()):
                    totals["refer_ce"] += F.cross_entropy(self.grounding(r, e).float(), want,
                                                          ignore_index=-100)
        loss = (c.class_weight * (totals["segment_class"] + totals["refer_ce"])
                + c.mask_weight * (totals["segment_bce"] + totals["prompt_bce"])
                + c.dice_weight * (totals["segment_dice"] + totals["prompt_dice"]))
        layers = len(r["outs"])  # logged per layer
        logs = {key: (v.detach() / layers if torch.is_tensor(v) else torch.tensor(v))
                for key, v in totals.items()}
        return {"loss": loss, "segment": (loss / layers).detach(), **logs,
                "tokens": batch["packed"].num_tokens}


# -- inference (Mask2Former's semantic and panoptic post-processing) -------------------------
def semantic_map(class_logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """[Q, K+1] logits and [Q, H, W] mask logits -> [H, W] class ids: argmax over classes of
    sum_q p(class | q) sigmoid(mask_q)."""
    prob = class_logits.float().softmax(-1)[:, :-1]
    return torch.einsum("qc,qhw->chw", prob, masks.float().sigmoid()).argmax(0)


def panoptic_map(class_logits: torch.Tensor, masks: torch.Tensor, stuff: set[int],
                 object_threshold: float = 0.8, overlap_threshold: float = 0.8
                 ) -> tuple[torch.Tensor, dict[int, int]]:
    """[H, W] segment ids (0: none) and {segment id: class}: queries above
    ``object_threshold`` claim the pixels where they score highest (class probability x
    mask probability); a query keeps its segment when at least ``overlap_threshold`` of its
    own mask survives; the segments of one stuff class merge."""
    prob = class_logits.float().softmax(-1)
    scores, labels = prob.max(-1)
    k = class_logits.shape[-1] - 1
    keep = (labels != k) & (scores > object_threshold)
    m = masks.float().sigmoid()
    ids = torch.zeros(masks.shape[-2:], dtype=torch.long)
    classes: dict[int, int] = {}
    if not keep.any():
        return ids, classes
    m, scores, labels = m[keep], scores[keep], labels[keep]
    owner = (scores[:, None, None] * m).argmax(0)
    stuff_ids: dict[int, int] = {}
    for q in range(len(m)):
        c = int(labels[q])
        mine = (owner == q) & (m[q] >= 0.5)
        area, full = int(mine.sum()), int((m[q] >= 0.5).sum())
        if area == 0 or full == 0 or area / full < overlap_threshold:
            continue
        if c in stuff and c in stuff_ids:
            ids[mine] = stuff_ids[c]
            continue
        sid = len(classes) + 1
        classes[sid] = c
        if c in stuff:
            stuff_ids[c] = sid
        ids[mine] = sid
    return ids, classes
