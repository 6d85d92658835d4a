"""Retrieval: captions and spoken captions -> images, images -> captions (UNITER / ALBEF),
trained and scored through the retrieval head (``heads/retrieval.py``).

Training batch: each sampled image with one of its captions (drawn from ``gen``) and, when
the corpus has speech and ``tasks.retrieval.speech`` is on, its spoken caption's frames;
the ITC samples are packed here, the ITM pairs in the head (hard negatives ask the model).
``match`` marks the caption-image pairs that are right although not the sample's own (a
caption that another image of the batch also has): never drawn as negatives.

Evaluation (UNITER's protocol): the gallery is the first ``limit`` images; text -> image
queries are every caption of each of them, image -> text queries the images against all
those captions (a hit when any of the image's own captions is in the top K), spoken
caption -> image queries each image's spoken caption. Recall@1/5/10 with ties broken
against the model; ``ceiling_r1`` is the best text -> image R@1 reachable when captions
repeat across the gallery. The validation metric ``r_mean`` is the mean of every recall
reported (UNITER's R@mean): steadier than R@1 on small validation sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from omnimask.config import check_fields
from omnimask.fusion.packing import Segment, pack

from ..objectives.base import image_segment, pick_caption, text_segment
from .base import Task, evaluating, first, task

KS = (1, 5, 10)


@dataclass
class RetrievalConfig:
    speech: bool = True  # spoken captions (training and s2i) when the corpus has them
    rerank_k: int | None = None  # evaluation's ITM re-ranking depth; None: the head's
    examples: int = 4  # text (and spoken) queries shown in the examples PNG

    def __post_init__(self) -> None:
        check_fields(self, ">=0", "rerank_k", "examples", prefix="tasks.retrieval.")


def caption_matches(captions: list[list[int]], image_captions: list[list[list[int]]]
                    ) -> torch.Tensor:
    """[Q, N] bool: caption q is (token for token) one of image n's captions."""
    sets = [{tuple(c) for c in caps} for caps in image_captions]
    return torch.tensor([[tuple(c) in s for s in sets] for c in captions], dtype=torch.bool)


@task("retrieval")
class Retrieval(Task):
    metric = "r_mean"
    Config = RetrievalConfig

    def uses_speech(self, corpus) -> bool:
        return bool(self.cfg.speech) and corpus.has_speech

    def _cls(self) -> Segment:
        return Segment("text", ids=torch.tensor([self.ctx.sp("cls")]))

    def _speech(self, corpus, i: int) -> list[Segment]:
        """``<cls>`` + the spoken caption's frames: the speech side's ITC sample and ITM
        query."""
        return [self._cls(), Segment("speech", features=corpus.speech[i].float())]

    def batch(self, corpus, idx: list[int], gen: torch.Generator) -> dict:
        idx = list(idx)
        caps = [pick_caption(corpus, i, gen) for i in idx]
        text = [[text_segment(self.ctx, c)] for c in caps]
        images = [image_segment(corpus, i, self.ctx.pixels) for i in idx]
        samples = text + [[self._cls(), im] for im in images]
        own = [corpus.captions[i] for i in idx]
        b = {"n": len(idx), "text": text, "image": images, "speech": None,
             "match": caption_matches(caps, own),
             "seed": int(torch.randint(2 ** 31 - 1, (1,), generator=gen))}
        if self.uses_speech(corpus):
            b["speech"] = [self._speech(corpus, i) for i in idx]
            samples += b["speech"]
            b["speech_match"] = caption_matches(
                [corpus.captions[i][corpus.spoken[i]] for i in idx], own)
        b["packed"] = pack(samples)
        return b

    # -- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def scores(self, model, corpus, idx: list[int]) -> dict:
        """The score matrices of the gallery ``idx``: ``t2i`` [captions, images], ``i2t``
        [images, captions], ``s2i`` [images, images] (with speech), each ITC with its rows'
        top k re-ranked by ITM; ``text_to_image``: each caption's image (position in idx)."""
        head, enc = model.heads[self.name], model.encoder
        cls = self.ctx.sp("cls")
        k = self.cfg.rerank_k
        images = [image_segment(corpus, i, self.ctx.pixels) for i in idx]
        texts, owner = [], []
        for pos, i in enumerate(idx):
            for c in corpus.captions[i]:
                texts.append(text_segment(self.ctx, c))
                owner.append(pos)
        t, v = head.embed_texts(enc, texts), head.embed_images(enc, images, cls)
        itc = (t @ v.T).float().cpu()
        img, txt = [[x] for x in images], [[x] for x in texts]
        out = {"t2i": head.rerank(enc, itc, txt, img, k),
               "i2t": head.rerank(enc, itc.T, img, txt, k, query_is_image=True),
               "text_to_image": torch.tensor(owner)}
        if self.uses_speech(corpus):
            sp = [self._speech(corpus, i) for i in idx]
            s = head.embed_speech(enc, [x[1] for x in sp], cls)
            ks = k if head.cfg.speech_itm else 0
            out["s2i"] = head.rerank(enc, (s @ v.T).float().cpu(), sp, img, ks)
        return out

    @torch.no_grad()
    def evaluate(self, model, corpus, limit: int | None = None,
                 examples: Path | None = None) -> dict:
        from ..metrics import ceiling_r1, recall_at_k

        self.check(corpus, "evaluation data")
        idx = first(corpus, limit)
        with evaluating(model):
            sc = self.scores(model, corpus, idx)
        owner = sc["text_to_image"]
        # each direction from its own re-ranked matrix (recall_at_k reads [texts, images])
        m = recall_at_k(sc["t2i"], owner, KS, prefix="t", i2t=False)
        m |= {k: v for k, v in recall_at_k(sc["i2t"].T, owner, KS, prefix="t").items()
              if k.startswith("i2t")}
        if "s2i" in sc:
            m |= recall_at_k(sc["s2i"], torch.arange(len(idx)), KS, prefix="s", i2t=False)
        m["r_mean"] = sum(m.values()) / len(m)
        m["ceiling_r1"] = ceiling_r1(self._caption_texts(corpus, idx), owner)
        if examples is not None and self.cfg.examples and corpus.pixels is not None:
            self.report_examples(corpus, idx, sc, Path(examples) / "retrieval_examples.png")
        return m

    @staticmethod
    def _caption_texts(corpus, idx: list[int]) -> list[str]:
        """Every caption of the gallery as written (its ids joined when the corpus keeps no
        texts), in ``scores``' caption order."""
        return [corpus.texts[i][j] if corpus.texts else " ".join(map(str, c))
                for i in idx for j, c in enumerate(corpus.captions[i])]

    def report_examples(self, corpus, idx: list[int], sc: dict, path: Path) -> Path:
        """Top-5 images for the first caption of the first ``examples`` images, then for
        their spoken captions: one row per query, titled with it, the right image framed."""
        n = min(self.cfg.examples, len(idx))
        words = self._caption_texts(corpus, idx)
        owner = sc["text_to_image"].tolist()
        rows = []
        for q in range(n):
            row = owner.index(q)  # the image's first caption
            rows.append((f"text: {words[row]}", sc["t2i"][row], q))
        if "s2i" in sc:
            for q in range(n):
                said = words[owner.index(q) + corpus.spoken[idx[q]]]
                rows.append((f"spoken: {said}", sc["s2i"][q], q))
        return top5_grid(corpus, idx, rows, path)


def top5_grid(corpus, idx: list[int], rows: list[tuple[str, torch.Tensor, int]],
              path: Path, size: int = 96) -> Path:
    """A PNG: for each (title, scores over the gallery ``idx``, right position) the title
    over its top-5 images, ranked left to right, the right one framed in green (drawn with
    PIL: pixel-exact thumbnails, no figure layout to tune)."""
    from PIL import Image, ImageDraw, ImageFont

    cols, pad, band = min(5, len(idx)), 6, 34
    font = ImageFont.load_default(size=13)
    sheet = Image.new("RGB", (pad + cols * (size + pad), len(rows) * (band + size + pad) + pad),
                      "white")
    draw = ImageDraw.Draw(sheet)
    for r, (title, scores, right) in enumerate(rows):
        y = pad + r * (band + size + pad)
        while draw.textlength(title, font=font) > sheet.width - 2 * pad and len(title) > 4:
            title = title[:-4] + "..."  # shortened until it fits the row
        draw.text((pad, y), title, fill="black", font=font)
        for c, j in enumerate(scores.topk(cols).indices.tolist()):
            x = pad + c * (size + pad)
            img = Image.fromarray(corpus.pixels[idx[j]].permute(1, 2, 0).numpy())
            sheet.paste(img.resize((size, size), Image.NEAREST), (x, y + band))
            hit = j == right
            draw.rectangle((x - 3, y + band - 3, x + size + 2, y + band + size + 2),
                           outline="green" if hit else "lightgray", width=4 if hit else 1)
            draw.text((x, y + 17), f"#{c + 1}" + (" right" if hit else ""),
                      fill="green" if hit else "gray", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
