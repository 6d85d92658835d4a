"""Captioning: image -> caption with the prefix-LM caption head (``heads/captioning.py``).

Training batch: each sampled image with one of its captions (drawn from ``gen``) as
``[image][<cls> caption <eos>]``. Evaluation: captions of the first ``limit`` images by
the head's decoding settings (beam search on the KV cache), scored with coco-caption's
BLEU-4, CIDEr-D and METEOR (``train/metrics.caption_metrics``) against every reference,
and, on ShapesWorld, by the (colour, shape) objects they name (``train/evaluate.
object_match``, as pretraining scores CM3's captions) beside chance: the same caption
against the next evaluated image's references.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import torch

from omnimask.config import check_choice, check_fields
from omnimask.errors import OmnimaskError
from omnimask.heads.captioning import START, CaptionHeadConfig, caption_batch, generate
from omnimask.modalities.image.processor import HUE_WORDS, hue_rotate

from ..objectives.base import image_segment, pick_caption
from .base import Task, first, task

# our object scores -> object_match's keys; recall: precision alone rewards a caption that
# names one object it is sure of, repeated
OBJECT_SCORES = {"color_precision": "colour_precision", "shape_precision": "shape_precision",
                 "pair_precision": "precision", "pair_recall": "recall"}


@dataclass
class CaptionConfig:
    eval_images: int = 32  # images captioned at once in evaluation
    examples: int = 12  # images shown in the examples PNG
    meteor: bool = True  # METEOR too (needs Java; ~20 s of JVM per evaluation)
    tokenizer: str = "auto"  # caption_metrics' tokenizer: auto (PTB with Java) | ptb | simple
    # decoding against the language prior (heads.caption.prior_weight); unset: the head's
    prior_weight: float | None = None
    # > 0: a product of experts in training (Clark et al., 2019, as tasks.vqa's
    # debias_question) with what the word before says beyond its class: the logits get
    # log p(w | u) - log p(w | class of u) when u is one of `debias_words` (the training
    # captions' word pairs smoothed with this many pseudo-counts of the class's), so the
    # head need not learn which shapes a colour's name rules out; decoding reads it alone
    debias_prior: float = 0.0
    debias_words: list[str] = field(default_factory=lambda: list(HUE_WORDS))
    # the share of training images that also come hue-turned (a random angle) in the same
    # batch, their caption's hue words (`debias_words`) read as <mask> and not predicted:
    # the other words, shapes first, are learned apart from colour (pixel models only)
    hue_copy: float = 0.0

    def __post_init__(self) -> None:
        p = "tasks.caption."
        check_fields(self, ">=1", "eval_images", prefix=p)
        check_fields(self, ">=0", "examples", "debias_prior", prefix=p)
        check_fields(self, "[0,1]", "hue_copy", prefix=p)
        check_fields(self, ">=0", "prior_weight", prefix=p)
        check_choice(self, "tokenizer", ("auto", "ptb", "simple"), prefix=p)


@task("caption")
class Caption(Task):
    metric = "cider"
    Config = CaptionConfig

    def __init__(self, ctx, cfg=None) -> None:
        super().__init__(ctx, cfg)
        self.head = CaptionHeadConfig()  # the head's settings, read back by ``bind``
        self._bias = None  # (corpus, {token: bias row}) of debias_prior
        if self.cfg.hue_copy and not ctx.pixels:
            raise OmnimaskError("tasks.caption.hue_copy turns pixels: it needs "
                                "model.image_input=pixels (feature rows are not changed)")
        self._hues = None  # the token ids of debias_words
        if self.cfg.debias_prior or self.cfg.hue_copy:
            self._hues = torch.tensor(ctx.text.word_ids(self.cfg.debias_words), dtype=torch.long)
            if not len(self._hues):
                raise OmnimaskError("tasks.caption.debias_words: none of them is one token of "
                                    "the text tokenizer (debias_prior and hue_copy need them)")

    def bind(self, model) -> None:
        hc = model.head_configs.get(self.name)
        if hc is not None:
            self.head = hc

    def check(self, corpus, what: str) -> None:
        super().check(corpus, what)
        if not any(corpus.captions):
            raise OmnimaskError(f"{what}: the shards have no captions; captioning needs them")

    def batch(self, corpus, idx: list[int], gen: torch.Generator) -> dict:
        idx = [i for i in idx if corpus.captions[i]]
        if not idx:
            raise OmnimaskError("a caption batch without captions: the sampled images have none")
        caps = [pick_caption(corpus, i, gen) for i in idx]
        images = [image_segment(corpus, i, self.ctx.pixels) for i in idx]
        hidden = [None] * len(idx)
        if self.cfg.hue_copy:
            for i, cap in zip(idx, list(caps)):
                if torch.rand((), generator=gen) < self.cfg.hue_copy:
                    turn = float(torch.rand((), generator=gen)) * 2 * math.pi
                    seg = image_segment(corpus, i, self.ctx.pixels)
                    seg.pixels = hue_rotate(seg.pixels, turn)
                    images.append(seg)
                    caps.append(cap)
                    hidden.append(self._hues)
        b = caption_batch(self.ctx.vocab, images, caps, self.head.max_len, hidden)
        if self.cfg.debias_prior:
            b["prior"] = self.word_bias(corpus, b["packed"])
        return b

    def word_bias(self, corpus, packed) -> torch.Tensor:
        """[targets, text ids] the debias expert's logits of each target of ``packed``: the
        row of the token it follows (zeros after a token not in ``debias_words``)."""
        size = self.ctx.vocab.text_size
        if self._bias is None or self._bias[0] is not corpus:
            table = word_bias_table(
                [c for cs in corpus.captions for c in cs], set(self._hues.tolist()),
                self.ctx.sp(START), self.ctx.sp("eos"), size, self.cfg.debias_prior)
            # token id -> its row of ``rows`` (row 0: zeros, for every other token)
            index = torch.zeros(size, dtype=torch.long)
            index[list(table)] = torch.arange(1, len(table) + 1)
            rows = torch.cat([torch.zeros(1, size), *(r[None] for r in table.values())])
            self._bias = (corpus, table, index, rows)
        _, _, index, rows = self._bias
        return rows[index[packed.ids[packed.target_positions]]]

    def references(self, corpus, i: int) -> list[str]:
        """Image ``i``'s captions as written (decoded from their ids when not kept)."""
        if corpus.texts is not None and corpus.texts[i]:
            return list(corpus.texts[i])
        return [self.ctx.text.decode(c) for c in corpus.captions[i]]

    @torch.no_grad()
    def captions(self, model, corpus, idx: list[int]) -> list[str]:
        """Generated captions of images ``idx`` (the head's decoding settings)."""
        out = []
        for s in range(0, len(idx), self.cfg.eval_images):
            segs = [image_segment(corpus, i, self.ctx.pixels)
                    for i in idx[s:s + self.cfg.eval_images]]
            out += [self.ctx.text.decode(ids)
                    for ids in generate(model, segs, prior_weight=self.cfg.prior_weight)]
        return out

    def evaluate(self, model, corpus, limit: int | None = None,
                 examples: Path | None = None) -> dict:
        from omnimask.train.evaluate import object_match
        from omnimask.train.metrics import caption_metrics

        self.check(corpus, "evaluation data")
        idx = [i for i in first(corpus, limit) if corpus.captions[i]]
        if not idx:
            raise OmnimaskError("evaluation data: none of the evaluated images has a caption")
        preds = self.captions(model, corpus, idx)
        refs = [self.references(corpus, i) for i in idx]
        keys = [corpus.keys[i] for i in idx]
        report = caption_metrics(dict(zip(keys, preds)), dict(zip(keys, refs)),
                                 meteor=self.cfg.meteor, tokenizer=self.cfg.tokenizer)
        report.setdefault("meteor", None)  # None: METEOR off or unable to run (no Java)
        own = [object_match(p, r) for p, r in zip(preds, refs)]
        chance = [object_match(p, refs[(k + 1) % len(refs)]) for k, p in enumerate(preds)]
        for name, key in OBJECT_SCORES.items():
            report[name] = round(sum(m[key] for m in own) / len(own), 4)
            report[f"{name}_chance"] = round(sum(m[key] for m in chance) / len(chance), 4)
        report["images"] = len(idx)
        if examples is not None and self.cfg.examples:
            n = self.cfg.examples
            caption_examples(corpus, list(zip(idx, preds, refs))[:n],
                             Path(examples) / "caption_examples.png")
        return report


def word_bias_table(captions: list[list[int]], words: set[int], start: int, end: int,
                    size: int, pseudo: float) -> dict[int, torch.Tensor]:
    """{u in ``words``: [size] log p(w | u) - log p(w | class)} from the token pairs of
    ``captions`` read as ``[start] caption [end]``: the class pools every token of ``words``;
    p(. | u) is u's next-token counts smoothed with ``pseudo`` counts of the class's
    distribution; tokens the class is never followed by get 0 (the head learns them)."""
    after: dict[int, torch.Tensor] = {u: torch.zeros(size, dtype=torch.float64) for u in words}
    for cap in captions:
        seq = [start, *map(int, cap), end]
        for u, w in zip(seq, seq[1:]):
            if u in after and 0 <= w < size:
                after[u][w] += 1
    pooled = sum(after.values(), torch.zeros(size, dtype=torch.float64))
    if not pooled.sum():
        return {}
    cls = pooled / pooled.sum()
    out = {}
    for u, c in after.items():
        if c.sum():
            p = (c + pseudo * cls) / (c.sum() + pseudo)
            out[u] = torch.where(cls > 0, p.log() - cls.log(), 0.0).float()
    return out


def caption_examples(corpus, shown: list[tuple[int, str, list[str]]], path: Path,
                     size: int = 128) -> Path:
    """A PNG grid: each image with the model's caption and its first reference under it,
    under a title. Drawn with PIL (a dependency already; matplotlib is not)."""
    from PIL import Image, ImageDraw, ImageFont

    font, big = ImageFont.load_default(size=12), ImageFont.load_default(size=15)
    cols, pad, width, line = min(4, max(1, len(shown))), 10, 30, 15
    cells = [(i, textwrap.wrap(f"model: {pred or '(empty)'}", width),
              textwrap.wrap(f"reference: {refs[0]}", width)) for i, pred, refs in shown]
    text_h = line * max((len(a) + len(b) for _, a, b in cells), default=0) + pad
    cell_w, cell_h = max(size, 7 * width) + pad, size + text_h + pad
    rows = (len(cells) + cols - 1) // cols
    sheet = Image.new("RGB", (pad + cols * cell_w, 30 + rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 8), "Captioning: the model's caption (blue) and a reference (black)",
              fill="black", font=big)
    for k, (i, mine, ref) in enumerate(cells):
        x, y = pad + (k % cols) * cell_w, 30 + (k // cols) * cell_h
        if corpus.pixels is not None:
            img = Image.fromarray(corpus.pixels[i].permute(1, 2, 0).numpy())
            sheet.paste(img.resize((size, size), Image.NEAREST), (x, y))
        for j, (text, colour) in enumerate([(t, "navy") for t in mine]
                                           + [(t, "black") for t in ref]):
            draw.text((x, y + size + 4 + j * line), text, fill=colour, font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
