"""The Python inference API of a loaded model (``omnimask.load(dir)``), as a notebook user
calls it::

    model = omnimask.load("runs/finetune/vqa/model")
    model.answer("scene.png", "what color is the circle?")   # {"answer": "red", "score": 0.97}

Images may be paths, PIL images, uint8 arrays (HxW or HxWxC) or uint8 tensors ([3, H, W]
or a batch [B, 3, H, W]); they are resized to the model's image size as in training.
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
        return Image.fromarray(x.permute(1, 2, 0).numpy())
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
def prepare_images(model, images: list) -> Images:
    toks = model.tokenizers or {}
    if "image" not in toks:
        raise OmnimaskError("this model was not loaded with its image tokenizer "
                            "(omnimask.load a model directory)")
    tok = toks["image"]
    pixels = tok.prepare([_one(x, i) for i, x in enumerate(images)])
    z = tok.model.unit_latents(pixels)
    side = tok.model.cfg.tokens_side
    return Images(pixels=pixels, features=z, grid=(side, side))


def _task(model, name: str):
    from omnimask.train.tasks.base import TASKS, TaskContext

    if name not in model.heads:
        raise OmnimaskError(f"this model has no {name} head (its heads: "
                            f"{', '.join(model.heads) or 'none'}); fine-tune one with "
                            f"omnimask finetune {name}")
    toks = model.tokenizers or {}
    ctx = TaskContext(vocab=model.vocab, text=toks.get("text"),
                      pixels=model.cfg.image_input == "pixels", speech=toks.get("speech"))
    t = TASKS.create(name, ctx)
    t.bind(model)
    return t


@torch.no_grad()
def answer(model, image, question: str | list[str], batch_size: int = 64):
    """The answer to ``question`` about ``image`` (``{"answer", "score"}``, score = the
    answer's sigmoid probability); lists of images and questions (one each, paired) give a
    list."""
    images, single = as_list(image)
    questions = [question] if isinstance(question, str) else list(question)
    if len(questions) != len(images):
        raise OmnimaskError(f"{len(images)} images and {len(questions)} questions; give one "
                            "question per image")
    task = _task(model, "vqa")
    was = model.training
    model.eval()
    out = []
    try:
        for s in range(0, len(images), batch_size):
            ims = prepare_images(model, images[s:s + batch_size])
            qs = [[{"ids": model.tokenizers["text"].tok.encode(q, add_special_tokens=False).ids}]
                  for q in questions[s:s + batch_size]]
            out += [{"answer": a, "score": round(p, 4)}
                    for a, p in task.predict(model, ims, list(range(len(ims))), qs)]
    finally:
        model.train(was)
    return out[0] if single and isinstance(question, str) else out
