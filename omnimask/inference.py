"""The Python inference API of a loaded model (``omnimask.load(dir)``), as a notebook user
calls it::

    model = omnimask.load("runs/finetune/vqa/model")
    model.answer("scene.png", "what color is the circle?")   # {"answer": "red", "score": 0.97}

Images may be paths, PIL images, uint8 arrays (HxW or HxWxC) or uint8 tensors ([3, H, W]
or a batch [B, 3, H, W]); they are fitted to the model's image size as training fits them
(``data.image_fit``: the centre square by default); ``segment`` pads them instead, so that
its masks cover the whole image.
Batching happens inside. The same task code that ``omnimask eval`` runs answers, so
what the API returns is what the metrics measured.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnimask.errors import OmnimaskError


@dataclass
class Images:
    """Prepared images in the form the tasks read (as a corpus holds them)."""

    pixels: torch.Tensor  # [N, 3, S, S] uint8
    features: torch.Tensor  # [N, P, d] the VQ latents (the trunk's input for vq_latents models)
    grid: tuple[int, int]

    def __len__(self) -> int:
        return len(self.pixels)


def _one(x: Any, i: int):
    from PIL import Image

    if isinstance(x, (str, os.PathLike)):
        p = Path(x)
        if not p.is_file():
            raise OmnimaskError(f"image {i}: no file at {p}")
        try:
            with Image.open(p) as im:
                return im.convert("RGB")
        except OSError as e:
            raise OmnimaskError(f"image {i}: {p} is not an image ({e})") from None
    if isinstance(x, torch.Tensor):
        if x.dtype != torch.uint8 or x.ndim != 3 or x.shape[0] != 3:
            raise OmnimaskError(f"image {i}: expected a uint8 tensor [3, H, W], got "
                                f"{x.dtype} {tuple(x.shape)}")
        return Image.fromarray(x.detach().cpu().permute(1, 2, 0).numpy())  # GPU tensors too
    if isinstance(x, (np.ndarray, Image.Image)):
        return x
    raise OmnimaskError(f"image {i}: expected a path, PIL image, uint8 array or tensor, got "
                        f"{type(x).__name__}")


def as_list(x: Any) -> tuple[list, bool]:
    """(items, was_single): one image or a list/batch of them."""
    if isinstance(x, torch.Tensor) and x.ndim == 4:
        return list(x), False
    if isinstance(x, (list, tuple)):
        return list(x), False
    return [x], True


@torch.no_grad()
def prepare_images(model, images: list, fit: str = "crop") -> Images:
    toks = model.tokenizers or {}
    if "image" not in toks:
        raise OmnimaskError("this model was not loaded with its image tokenizer "
                            "(omnimask.load a model directory)")
    tok = toks["image"]
    pixels = tok.prepare([_one(x, i) for i, x in enumerate(images)], fit)
    z = tok.model.unit_latents(pixels)
    side = tok.model.cfg.tokens_side
    return Images(pixels=pixels, features=z, grid=(side, side))


@torch.no_grad()
def answer(model, image, question: str | list[str], batch_size: int = 64):
    """The answer to ``question`` about ``image`` (``{"answer", "score"}``, score = the
    answer's probability: its sigmoid, or the softmax with ``heads.vqa.loss=softmax``);
    lists of images and questions (one each, paired) give a list."""
    images, single = as_list(image)
    questions = [question] if isinstance(question, str) else list(question)
    if len(questions) != len(images):
        raise OmnimaskError(f"{len(images)} images and {len(questions)} questions; give one "
                            "question per image")
    from omnimask.train.tasks.base import evaluating, task_for

    task = task_for(model, "vqa")
    out = []
    with evaluating(model):
        for s in range(0, len(images), batch_size):
            ims = prepare_images(model, images[s:s + batch_size])
            qs = [[{"ids": model.tokenizers["text"].tok.encode(q, add_special_tokens=False).ids}]
                  for q in questions[s:s + batch_size]]
            out += [{"answer": a, "score": round(p, 4)}
                    for a, p in task.predict(model, ims, list(range(len(ims))), qs)]
    return out[0] if single and isinstance(question, str) else out


@torch.no_grad()
def caption(model, image, beams: int | None = None, max_len: int | None = None,
            batch_size: int = 64, prior_weight: float | None = None):
    """The caption of ``image`` (a string; a list for a list of images); ``beams``,
    ``max_len`` and ``prior_weight`` (decoding against the language prior) default to the
    caption head's settings (beam search when beams > 1)."""
    from omnimask.heads.captioning import generate
    from omnimask.train.objectives.base import image_segment
    from omnimask.train.tasks.base import task_for

    images, single = as_list(image)
    task = task_for(model, "caption")
    out = []
    for s in range(0, len(images), batch_size):
        ims = prepare_images(model, images[s:s + batch_size])
        segs = [image_segment(ims, i, task.ctx.pixels) for i in range(len(ims))]
        out += [task.ctx.text.decode(ids)
                for ids in generate(model, segs, beams=beams, max_len=max_len,
                                    prior_weight=prior_weight)]
    return out[0] if single else out


def _speech_frames(model, audio, i: int) -> torch.Tensor:
    """A spoken query as the speech tokenizer's frames: a file path or (wave, rate)."""
    import soundfile

    sp = (model.tokenizers or {}).get("speech")
    if sp is None:
        raise OmnimaskError("this model has no speech tokenizer: spoken queries need one")
    if isinstance(audio, (str, os.PathLike)):
        try:
            wave, rate = soundfile.read(str(audio), dtype="float32", always_2d=True)
        except (OSError, RuntimeError) as e:
            raise OmnimaskError(f"query {i}: {audio} is not readable audio ({e})") from None
        wave = torch.from_numpy(wave.T.copy())
    elif isinstance(audio, tuple) and len(audio) == 2:
        w = audio[0]
        w = w.detach().float().cpu() if isinstance(w, torch.Tensor) else np.asarray(w, np.float32)
        wave, rate = torch.as_tensor(w), int(audio[1])
    else:
        raise OmnimaskError(f"query {i}: a spoken query is an audio file path or a (wave, "
                            f"sample_rate) pair, got {type(audio).__name__}")
    return sp.features(wave, rate, f"query {i}").float()


AUDIO_SUFFIXES = (".flac", ".wav", ".ogg", ".mp3")


def _is_audio(q) -> bool:
    """A spoken query: a (wave, rate) pair, a path object, or a string naming an existing
    audio file (any other string is a caption)."""
    if isinstance(q, str):
        return q.lower().endswith(AUDIO_SUFFIXES) and Path(q).is_file()
    return True


@torch.no_grad()
def retrieve(model, query, gallery, k: int = 5, rerank_k: int | None = None):
    """The ``k`` gallery images that best match ``query``: a caption (str) or a spoken one
    (an existing .flac/.wav/.ogg/.mp3 file, a path object, or a (wave, sample_rate) pair).
    Returns ``{"indices", "scores"}`` (best first; scores: ITC cosines, the re-ranked top
    ones lifted above the rest); a list of queries gives a list. ``rerank_k``: how many ITC candidates ITM re-ranks (default:
    the head's ``rerank_k``)."""
    from omnimask.heads.retrieval import rank
    from omnimask.train.objectives.base import image_segment
    from omnimask.train.tasks.base import evaluating, task_for

    task = task_for(model, "retrieval")
    queries = list(query) if isinstance(query, list) else [query]
    items, _ = as_list(gallery)
    if not items:
        raise OmnimaskError("retrieve: the gallery is empty")
    ims = prepare_images(model, items)
    segs = [image_segment(ims, i, task.ctx.pixels) for i in range(len(ims))]
    spoken = [_is_audio(q) for q in queries]
    if any(spoken) and not all(spoken):
        raise OmnimaskError("retrieve: give either captions or spoken queries in one call")
    with evaluating(model):
        if spoken[0]:
            from omnimask.fusion.packing import Segment

            qs = [Segment("speech", features=_speech_frames(model, q, i))
                  for i, q in enumerate(queries)]
        else:
            text = model.tokenizers["text"].tok
            qs = [text.encode(q, add_special_tokens=False).ids for q in queries]
        scores = rank(model, qs, segs, k=rerank_k, query_side="speech" if spoken[0] else "text")
    top = scores.topk(min(k, len(items)), dim=-1)
    out = [{"indices": i.tolist(), "scores": [round(float(s), 4) for s in v]}
           for i, v in zip(top.indices, top.values)]
    return out if isinstance(query, list) else out[0]


def _size(x) -> tuple[int, int]:
    """(height, width) of an image as ``_one`` returns it (PIL or array)."""
    if isinstance(x, np.ndarray):
        return int(x.shape[0]), int(x.shape[1])
    return int(x.size[1]), int(x.size[0])


def _clicks(point, geo) -> torch.Tensor:
    """``(x, y)`` or a list of ``(x, y[, positive])`` in pixels -> [n, 3] clicks in the
    model's square (``geo``: where the image lies in it)."""
    pts = [point] if len(point) in (2, 3) and not isinstance(point[0], (list, tuple)) else point
    rows = []
    for p in pts:
        if len(p) not in (2, 3):
            raise OmnimaskError(f"segment: a click is (x, y) or (x, y, positive), got {p!r}")
        x, y = float(p[0]), float(p[1])
        if not (0 <= x < geo.w and 0 <= y < geo.h):
            raise OmnimaskError(f"segment: click ({x}, {y}) lies outside the {geo.w}x{geo.h} "
                                "image")
        rows.append([*geo.point(x + 0.5, y + 0.5), float(bool(p[2]) if len(p) == 3 else 1)])
    return torch.tensor(rows, dtype=torch.float32)


@torch.no_grad()
def segment(model, image, text: str | None = None, point=None, box=None,
            classes: list[str] | None = None, batch_size: int = 32):
    """Segment ``image`` (a list of images gives a list):

    - no prompt: the per-pixel class ids, a long tensor [H, W] at the image's own size
      (names: ``model.head_configs["segment"].class_names``, or ``classes``: other class
      names, open vocabulary);
    - ``text`` (a referring expression), ``point`` ((x, y) in pixels, or a list of (x, y,
      positive) clicks) or ``box`` ((x0, y0, x1, y1) in pixels): ``{"mask": bool [H, W],
      "score"}`` (score: the mean mask probability inside the mask, times, for an
      expression, the probability of the object it picked).
    """
    from omnimask.heads.segmentation import semantic_map
    from omnimask.modalities.image.processor import Fit
    from omnimask.train.objectives.base import text_segment
    from omnimask.train.tasks.base import evaluating, task_for

    if sum(x is not None for x in (text, point, box)) > 1:
        raise OmnimaskError("segment: give one prompt (text, point or box) per call")
    task = task_for(model, "segment")
    items, single = as_list(image)
    pil = [_one(x, i) for i, x in enumerate(items)]
    sizes = [_size(x) for x in pil]
    out = []
    with evaluating(model):
        for s in range(0, len(pil), batch_size):
            chunk = pil[s:s + batch_size]
            ims = prepare_images(model, chunk, fit="pad")
            side = int(ims.pixels.shape[-1])
            geos = [Fit(h, w, side, "pad") for h, w in sizes[s:s + batch_size]]
            idx = list(range(len(ims)))
            prompts, texts = [], None
            for k, geo in enumerate(geos):
                if point is not None:
                    prompts.append({"image": k, "kind": "point", "clicks": _clicks(point, geo)})
                elif box is not None:
                    x0, y0, x1, y1 = (float(v) for v in box)
                    if not (x0 < x1 and y0 < y1):
                        raise OmnimaskError(f"segment: box {tuple(box)} must be (x0, y0, x1, "
                                            "y1) with x0 < x1 and y0 < y1")
                    prompts.append({"image": k, "kind": "box", "box": torch.tensor(
                        [*geo.point(x0, y0), *geo.point(x1, y1)]).clamp(0, 1)})
            if text is not None:
                ids = model.tokenizers["text"].tok.encode(text, add_special_tokens=False).ids
                texts = [[text_segment(task.ctx, ids)] for _ in idx]
            r = task.run(model, ims, idx, prompts, texts, names=classes)
            for k, geo in enumerate(geos):
                if text is None and point is None and box is None:
                    ids = semantic_map(r["class_logits"][k], r["masks"][k])
                    out.append(geo.unfit(ids.float(), "nearest").long())
                    continue
                logit = geo.unfit(r["prompt_masks"][k])  # the square's masks: run() upsamples
                mask = logit > 0
                prob = logit.sigmoid()
                score = float(prob[mask].mean()) if mask.any() else 0.0
                score *= float(r["prompt_scores"][k])  # an expression: its grounding too
                out.append({"mask": mask, "score": round(score, 4)})
    return out[0] if single else out
