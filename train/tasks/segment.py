"""Segmentation through the prompted segment head (``heads/segmentation.py``): ``segment``
trains it and scores semantic, panoptic and interactive segmentation; ``refer`` scores its
referring expressions.

Training batch: each sampled image as blocks ``[image][<cls> expression]...`` (up to
``refs_per_image`` of its referring expressions, drawn from ``gen``), the class names, and
prompts: each expression (with the index of its object among the targets), a click prompt
on a random object (a first positive click well inside it, then up to ``max_clicks - 1``
positive clicks inside or negative ones near it) and, with probability ``boxes``, a box
around a random object (jittered by a pixel). The
targets: every instance (things) and one segment per stuff class present (its pixels), with
class ids in the head's class list (matched by name).

Evaluation (``segment``): semantic ``miou``, ``per_class_iou`` and ``pixel_accuracy``; panoptic
``pq``, ``sq``, ``rq``; interactive on the first ``noc_objects`` objects: ``point_miou`` (one
click, the protocol's first: the object's most interior point), ``box_miou`` (its tight box)
and ``noc85`` (clicks to IoU 0.85, at most ``noc_max_clicks``). ``refer``: ``miou`` and
``ciou`` of every referring expression of the first ``limit`` images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from omnimask.config import check_fields
from omnimask.errors import OmnimaskError
from omnimask.fusion.packing import pack
from omnimask.modalities.image.processor import HUE_WORDS, hue_rotate, words_pattern

from ..objectives.base import image_segment, text_segment
from ..segment_metrics import IGNORE
from .base import Task, evaluating, first, pack_blocks, task

# how a new head embeds its class names: as in a sentence, so that a BPE tokenizer reads the
# name's in-sentence token (" circle"), the one captions train, and by the trunk's state at
# the name's last token (the <cls> state barely depends on a one-word text)
CLASS_PROMPT, CLASS_POOL = "a {}", "last"


@dataclass
class SegmentConfig:
    refs_per_image: int = 2  # referring expressions trained per image
    max_clicks: int = 3  # a training click prompt has 1..max_clicks clicks
    boxes: float = 0.5  # probability that a training image gets a box prompt
    # probability that a training image's hue is turned by a random angle (pixel inputs):
    # classes named by shape must not be read from colour; such an image keeps only the
    # referring expressions that name no hue (``hue_words``), as flips drop "left"/"right"
    hue_jitter: float = 0.0
    hue_words: list[str] = field(default_factory=lambda: list(HUE_WORDS))
    eval_images: int = 32  # images per evaluation batch
    noc_objects: int = 50  # objects the interactive metrics are measured on
    noc_iou: float = 0.85
    noc_max_clicks: int = 10  # RITM's protocol stops at 20
    examples: int = 8  # images shown in the examples PNG

    def __post_init__(self) -> None:
        p = "tasks.segment."
        check_fields(self, ">=0", "refs_per_image", "noc_objects", "examples", prefix=p)
        check_fields(self, ">=1", "max_clicks", "eval_images", "noc_max_clicks", prefix=p)
        if not 0 <= self.boxes <= 1 or not 0 <= self.hue_jitter <= 1 or not 0 < self.noc_iou <= 1:
            raise ValueError(f"{p}boxes and hue_jitter must be in [0, 1] and noc_iou in (0, 1]")


def object_class(corpus, i: int, inst_id: int) -> int:
    """The corpus class id under instance ``inst_id`` of image ``i`` (its most frequent)."""
    under = corpus.seg[i][corpus.inst[i] == inst_id]
    return int(under.long().mode().values) if under.numel() else 0


def interior_point(mask: np.ndarray, rng: np.random.Generator | None = None) -> tuple[int, int]:
    """(row, col) inside ``mask``: its most interior pixel, or (``rng``) a random pixel at
    least half as deep as that."""
    from scipy.ndimage import distance_transform_edt

    d = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    if rng is None:
        r, c = np.unravel_index(int(np.argmax(d)), d.shape)
        return int(r), int(c)
    rows, cols = np.nonzero(d >= max(1.0, d.max() / 2))
    k = int(rng.integers(len(rows)))
    return int(rows[k]), int(cols[k])


def tight_box(mask: torch.Tensor) -> torch.Tensor:
    """[4] (x0, y0, x1, y1) of ``mask``'s pixels, in [0, 1] (pixel edges)."""
    rows, cols = torch.nonzero(mask, as_tuple=True)
    s = mask.shape[-1]
    return torch.tensor([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1],
                        dtype=torch.float32) / s


def click_tensor(clicks, size: int) -> torch.Tensor:
    """(row, col, positive) clicks -> [n, 3] (x, y in [0, 1] at pixel centres, positive)."""
    return torch.tensor([[(c + 0.5) / size, (r + 0.5) / size, float(pos)]
                         for r, c, pos in clicks], dtype=torch.float32)


@task("segment")
class Segment(Task):
    metric = "miou"
    Config = SegmentConfig

    def __init__(self, ctx, cfg=None) -> None:
        super().__init__(ctx, cfg)
        self.head_cfg = None
        self._names: dict[tuple[str, ...], object] = {}
        self._hue_re = words_pattern(self.cfg.hue_words)

    def check(self, corpus, what: str) -> None:
        super().check(corpus, what)
        if corpus.seg is None or corpus.inst is None:
            raise OmnimaskError(f"{what}: the shards have no seg.png and inst.png; "
                                "segmentation needs them")
        if self.cfg.hue_jitter > 0 and not self.ctx.pixels:
            raise OmnimaskError("tasks.segment.hue_jitter turns pixels, but the model reads "
                                "image features (model.image_input=pixels needs it)")

    def head_config(self, corpus) -> dict:
        return {"class_names": list(corpus.seg_classes), "class_prompt": CLASS_PROMPT,
                "class_pool": CLASS_POOL}

    def bind(self, model) -> None:
        hc = model.head_configs.get(self.head_name)
        if hc is None or not hc.class_names:
            raise OmnimaskError("the model's segment head has no class names "
                                "(heads.segment.class_names)")
        self.head_cfg = hc

    # -- classes -----------------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        return list(self.head_cfg.class_names) if self.head_cfg else []

    def class_batch(self, names: list[str] | None = None):
        """The class names packed as ``<cls> name`` samples (cached)."""
        key = tuple(names or self.class_names)
        if key not in self._names:
            prompt = self.head_cfg.class_prompt if self.head_cfg else CLASS_PROMPT
            ids = self.ctx.text.tok.encode_batch([prompt.format(n) for n in key],
                                                 add_special_tokens=False)
            self._names[key] = pack([[text_segment(self.ctx, e.ids)] for e in ids])
        return self._names[key]

    def class_map(self, corpus, strict: bool) -> torch.Tensor:
        """[256] corpus class id -> head class id (``IGNORE`` for names the head lacks,
        an error when ``strict``)."""
        lut = torch.full((256,), IGNORE, dtype=torch.long)
        index = {n: k for k, n in enumerate(self.class_names)}
        for k, n in enumerate(corpus.seg_classes or []):
            if n in index:
                lut[k] = index[n]
            elif strict:
                raise OmnimaskError(f"the data's class {n!r} is not one of the segment head's "
                                    f"classes ({', '.join(self.class_names)})")
        return lut

    @property
    def stuff(self) -> set[int]:
        return {k for k, n in enumerate(self.class_names) if n in set(self.head_cfg.stuff)}

    # -- targets -----------------------------------------------------------------------------
    def targets(self, corpus, i: int, lut: torch.Tensor) -> dict:
        """Image ``i``'s segments: ``labels`` [T], ``masks`` [T, S, S] float, ``ids`` (the
        instance id of each thing, -1 for stuff)."""
        seg, inst = lut[corpus.seg[i].long()], corpus.inst[i].long()
        stuff = self.stuff
        labels, masks, ids = [], [], []
        for j in inst.unique().tolist():
            if j == 0:
                continue
            c = int(lut[object_class(corpus, i, j)])
            if c == IGNORE or c in stuff:
                continue
            labels.append(c)
            masks.append(inst == j)
            ids.append(j)
        for c in sorted(stuff):
            m = seg == c
            if m.any():
                labels.append(c)
                masks.append(m)
                ids.append(-1)
        s = inst.shape[-1]
        return {"labels": torch.tensor(labels, dtype=torch.long),
                "masks": torch.stack(masks).float() if masks else torch.zeros(0, s, s),
                "ids": ids}

    def _objects(self, t: dict) -> list[int]:
        return [k for k, j in enumerate(t["ids"]) if j >= 0]

    def batch(self, corpus, idx: list[int], gen: torch.Generator) -> dict:
        lut = self.class_map(corpus, strict=True)
        rng = np.random.default_rng(int(torch.randint(2 ** 31 - 1, (1,), generator=gen)))
        images, texts, prompts, pmasks, targets = [], [], [], [], []
        for b, i in enumerate(idx):
            t = self.targets(corpus, i, lut)
            targets.append(t)
            image = image_segment(corpus, i, self.ctx.pixels)
            jitter = self.cfg.hue_jitter > 0 and rng.random() < self.cfg.hue_jitter
            if jitter:
                image = replace(image, pixels=hue_rotate(image.pixels, rng.uniform(0, 2 * math.pi)))
            images.append(image)
            mine = list(corpus.refs[i]) if corpus.refs else []
            if jitter:
                mine = [r for r in mine if not self._hue_re.search(r["expression"])]
            pick = rng.permutation(len(mine))[:self.cfg.refs_per_image].tolist()
            texts.append([text_segment(self.ctx, mine[k]["ids"]) for k in pick])
            for k in pick:  # target: the referred object among the image's targets
                inst = mine[k]["instance"]
                prompts.append({"image": b, "kind": "text", "target": t["ids"].index(inst)
                                if inst in t["ids"] else -1})
                pmasks.append(corpus.inst[i].long() == inst)
            objs = self._objects(t)
            if not objs:
                continue
            m = t["masks"][objs[int(rng.integers(len(objs)))]].bool()
            prompts.append({"image": b, "kind": "point",
                            "clicks": click_tensor(self._train_clicks(m.numpy(), rng),
                                                   m.shape[-1])})
            pmasks.append(m)
            if rng.random() < self.cfg.boxes:
                m = t["masks"][objs[int(rng.integers(len(objs)))]].bool()
                box = tight_box(m) + torch.from_numpy(rng.integers(-1, 2, 4)).float() / m.shape[-1]
                prompts.append({"image": b, "kind": "box", "box": box.clamp(0, 1)})
                pmasks.append(m)
        out = pack_blocks(images, texts)
        text_prompts = iter(out["cls"].tolist())
        for pr in prompts:
            if pr["kind"] == "text":
                pr["cls"] = next(text_prompts)
        out |= {"classes": self.class_batch(), "prompts": prompts, "targets": targets,
                "seed": int(rng.integers(2 ** 31 - 1))}
        if pmasks:
            out["prompt_masks"] = torch.stack(pmasks).float()
        return out

    def _train_clicks(self, mask: np.ndarray, rng: np.random.Generator) -> list[tuple]:
        """A first positive click deep inside ``mask``, then positive clicks inside or
        negative ones in a 4-pixel ring around it."""
        from scipy.ndimage import binary_dilation

        clicks = [(*interior_point(mask, rng), True)]
        ring = binary_dilation(mask, iterations=4) & ~mask
        for _ in range(int(rng.integers(self.cfg.max_clicks))):
            positive = rng.random() < 0.5 or not ring.any()
            rows, cols = np.nonzero(mask if positive else ring)
            k = int(rng.integers(len(rows)))
            clicks.append((int(rows[k]), int(cols[k]), positive))
        return clicks

    # -- inference ---------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, model, corpus, idx: list[int], prompts: list[dict] | None = None,
            texts: list[list] | None = None, names: list[str] | None = None) -> dict:
        """The head's outputs for images ``idx`` (masks upsampled to the image size), on the
        CPU whatever the model's device (metrics and pictures read them there);
        ``texts[k]``: image k's expression segments, prompts before ``prompts`` in
        ``prompt_masks``; ``names``: class names other than the head's (open vocabulary)."""
        images = [image_segment(corpus, i, self.ctx.pixels) for i in idx]
        b = pack_blocks(images, texts or [[] for _ in idx])
        owners = [k for k, ts in enumerate(texts or []) for _ in ts]
        text = [{"image": k, "kind": "text", "cls": c} for k, c in zip(owners, b["cls"].tolist())]
        b |= {"classes": self.class_batch(names), "prompts": text + list(prompts or [])}
        out = model(b, task=self.head_name)
        size = (corpus.pixels.shape[-1],) * 2
        up = {k: v for k, v in out.items()
              if k in ("class_logits", "masks", "prompt_masks", "prompt_scores")}
        if "masks" in up:
            up["masks"] = F.interpolate(up["masks"].float(), size=size, mode="bilinear",
                                        align_corners=False)
        if "prompt_masks" in up:
            up["prompt_masks"] = F.interpolate(up["prompt_masks"].float()[None], size=size,
                                               mode="bilinear", align_corners=False)[0]
        return {k: v.cpu() for k, v in up.items()}

    def evaluate(self, model, corpus, limit: int | None = None,
                 examples: Path | None = None) -> dict:
        from omnimask.heads.segmentation import panoptic_map, semantic_map

        from ..segment_metrics import PanopticMeter, SemanticMeter

        self.check(corpus, "evaluation data")
        lut = self.class_map(corpus, strict=False)
        k = len(self.class_names)
        sem, pan = SemanticMeter(k, self.class_names), PanopticMeter(k)
        idx = first(corpus, limit)
        shown = []
        with evaluating(model):
            for s in range(0, len(idx), self.cfg.eval_images):
                chunk = idx[s:s + self.cfg.eval_images]
                out = self.run(model, corpus, chunk)
                for j, i in enumerate(chunk):
                    pred = semantic_map(out["class_logits"][j], out["masks"][j])
                    truth = lut[corpus.seg[i].long()]
                    sem.add(pred, truth)
                    ids, classes = panoptic_map(out["class_logits"][j], out["masks"][j],
                                                self.stuff, self.head_cfg.object_threshold,
                                                self.head_cfg.overlap_threshold)
                    gt_ids, gt_classes = self.panoptic_truth(corpus, i, lut)
                    pan.add(ids, classes, gt_ids, gt_classes)
                    if len(shown) < self.cfg.examples:
                        shown.append((i, truth, pred))
            inter, clicked = self.interactive(model, corpus, idx)
        report = sem.report() | pan.report() | inter
        if examples is not None and self.cfg.examples:
            from .segment_examples import semantic_examples

            semantic_examples(corpus, shown, self.class_names,
                              Path(examples) / "segment_examples.png", clicked)
        report["images"] = len(idx)
        return report

    def panoptic_truth(self, corpus, i: int, lut: torch.Tensor):
        t = self.targets(corpus, i, lut)
        ids = torch.zeros(corpus.inst[i].shape, dtype=torch.long)
        classes = {}
        for k, (c, m) in enumerate(zip(t["labels"].tolist(), t["masks"].bool())):
            ids[m] = k + 1
            classes[k + 1] = c
        return ids, classes

    def object_list(self, corpus, idx: list[int], lut) -> list[tuple[int, torch.Tensor]]:
        """(image, mask) of the objects the interactive metrics use: the first
        ``noc_objects`` things of the images ``idx``."""
        out = []
        for i in idx:
            t = self.targets(corpus, i, lut)
            for k in self._objects(t):
                out.append((i, t["masks"][k].bool()))
                if len(out) >= self.cfg.noc_objects:
                    return out
        return out

    def prompt_masks(self, model, corpus, asks: list[tuple[int, dict]],
                     size: int) -> torch.Tensor:
        """bool [len(asks), H, W]: the mask of each visual prompt (image index, prompt
        without its ``image``), ``size`` prompts per forward: prompts never attend to each
        other, so one forward serves many."""
        out = []
        for c in range(0, len(asks), size):
            chunk = asks[c:c + size]
            images = sorted({i for i, _ in chunk})
            where = {i: b for b, i in enumerate(images)}
            prompts = [pr | {"image": where[i]} for i, pr in chunk]
            out.append(self.run(model, corpus, images, prompts)["prompt_masks"] > 0)
        return torch.cat(out)

    def interactive(self, model, corpus, idx: list[int]) -> tuple[dict, list[tuple]]:
        """The interactive metrics, and (image, clicks, mask) of the first few single
        clicks (for the examples PNG)."""
        from ..segment_metrics import clicks_to_iou_many, mask_iou, next_click, referring_report

        objs = self.object_list(corpus, idx, self.class_map(corpus, strict=False))
        if not objs:
            return {}, []
        s = corpus.pixels.shape[-1]
        firsts = [next_click(np.zeros(m.shape, bool), m.numpy()) for _, m in objs]
        asks = [a for (i, m), f in zip(objs, firsts)
                for a in ((i, {"kind": "point", "clicks": click_tensor([f], s)}),
                          (i, {"kind": "box", "box": tight_box(m)}))]
        out = self.prompt_masks(model, corpus, asks, 2 * self.cfg.eval_images)
        point = [mask_iou(out[2 * n], m) for n, (_, m) in enumerate(objs)]
        box = [mask_iou(out[2 * n + 1], m) for n, (_, m) in enumerate(objs)]
        clicked = [(i, [f], out[2 * n]) for n, ((i, _), f) in enumerate(zip(objs[:6], firsts))]

        def predict(asks: list[tuple[int, list]]) -> list:
            return list(self.prompt_masks(model, corpus, [
                (objs[j][0], {"kind": "point", "clicks": click_tensor(clicks, s)})
                for j, clicks in asks], self.cfg.eval_images).numpy())

        noc = [n for n, _ in clicks_to_iou_many(predict, [m.numpy() for _, m in objs],
                                               self.cfg.noc_iou, self.cfg.noc_max_clicks)]
        return {"point_miou": referring_report(point)["miou"],
                "box_miou": referring_report(box)["miou"],
                f"noc{round(self.cfg.noc_iou * 100)}": float(np.mean(noc)),
                "objects": len(objs)}, clicked


@task("refer", head="segment")
class Refer(Segment):
    """Referring segmentation: each expression's mask against its object."""
    metric = "miou"

    def check(self, corpus, what: str) -> None:
        super().check(corpus, what)
        if not corpus.refs or not any(corpus.refs):
            raise OmnimaskError(f"{what}: the shards have no referring expressions "
                                "(refs.json)")

    def evaluate(self, model, corpus, limit: int | None = None,
                 examples: Path | None = None) -> dict:
        from ..segment_metrics import mask_iou, referring_report

        self.check(corpus, "evaluation data")
        idx = [i for i in first(corpus, limit) if corpus.refs[i]]
        pairs, shown = [], []
        with evaluating(model):
            for s in range(0, len(idx), self.cfg.eval_images):
                chunk = idx[s:s + self.cfg.eval_images]
                texts = [[text_segment(self.ctx, r["ids"]) for r in corpus.refs[i]]
                         for i in chunk]
                out = self.run(model, corpus, chunk, texts=texts)["prompt_masks"] > 0
                n = 0
                for i in chunk:
                    for r in corpus.refs[i]:
                        truth = corpus.inst[i].long() == r["instance"]
                        pairs.append(mask_iou(out[n], truth))
                        if len(shown) < self.cfg.examples:
                            shown.append((i, r["expression"], out[n], truth))
                        n += 1
        report = referring_report(pairs)
        report["images"] = len(idx)
        if examples is not None and self.cfg.examples:
            from .segment_examples import referring_examples

            referring_examples(corpus, shown, Path(examples) / "refer_examples.png")
        return report
