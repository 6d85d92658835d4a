"""What every fine-tuning task shares: the context it reads and the interface ``omnimask
finetune`` / ``omnimask eval`` drive.

A task is a class registered in ``TASKS`` under the name of the head it trains
(``model.heads[name]``, a class in ``omnimask.heads`` registered in ``HEADS``). It has:

- ``Config``: a dataclass of its settings (``tasks.<name>`` in a fine-tuning config);
- ``metric``: the validation metric ``finetune`` maximises (the best checkpoint);
- ``head_config(corpus)``: the head's settings from the training data (VQA's answer list),
  or None for the head's defaults; ``bind(model)``: read them back from the built model;
- ``check(corpus, what)``: raise ``OmnimaskError`` naming ``what`` when the data lacks what
  the task needs (no ``qa.json``, no speech);
- ``batch(corpus, indices, gen)``: a training batch (all randomness from ``gen``);
- ``loss(model, batch) = model(batch, task=name)``: ``"loss"`` is optimised, the task's
  own name keys its main loss, other keys are logged;
- ``evaluate(model, corpus, limit, examples)``: the metrics dict of the eval JSON's
  ``"metrics"`` (``limit``: the first ``limit`` samples; ``examples``: a folder for
  qualitative PNGs, or None).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from omnimask.errors import OmnimaskError
from omnimask.modalities.vocab import Vocab
from omnimask.registry import Registry

TASKS: Registry = Registry("task", ("omnimask.train.tasks.vqa",
                                    "omnimask.train.tasks.retrieval",
                                    "omnimask.train.tasks.caption"))


def task(name: str):
    """Register a task class under ``name`` (also its ``name``: the head it trains)."""
    def deco(cls):
        cls.name = name
        return TASKS.register(name)(cls)
    return deco


@dataclass
class TaskContext:
    vocab: Vocab
    text: Any  # the text tokenizer (modalities/text/tokenizer.py)
    pixels: bool  # images enter as uint8 pixels (model.image_input=pixels), else features
    speech: Any = None  # the speech tokenizer, when the model has one

    def sp(self, role: str) -> int:
        return self.vocab.special(role)


class Task:
    """Defaults shared by every task (see the module docstring)."""

    name = ""
    metric = ""
    Config: type | None = None

    def __init__(self, ctx: TaskContext, cfg: Any = None) -> None:
        self.ctx = ctx
        self.cfg = cfg if cfg is not None else (self.Config() if self.Config else None)

    def head_config(self, corpus) -> Any:
        return None

    def bind(self, model) -> None:
        """Called once the model exists (its head built, loaded or fresh): read what the
        data side needs from the head's settings (VQA's answer list)."""

    def check(self, corpus, what: str) -> None:
        if corpus.pixels is None and self.ctx.pixels:
            raise OmnimaskError(f"{what}: the corpus keeps no pixels")

    def batch(self, corpus, idx: list[int], gen: torch.Generator) -> dict:
        raise NotImplementedError

    def loss(self, model, batch: dict) -> dict:
        return model(batch, task=self.name)

    def evaluate(self, model, corpus, limit: int | None = None,
                 examples: Path | None = None) -> dict:
        raise NotImplementedError


def task_for(model, name: str, where: str = "this model") -> Task:
    """Task ``name`` bound to a loaded model (its tokenizers and head settings): what
    ``omnimask eval`` and the Python API run; ``where`` names the model in errors."""
    if name not in model.heads:
        raise OmnimaskError(f"{where} has no {name} head (its heads: "
                            f"{', '.join(model.heads) or 'none'}); fine-tune one with "
                            f"omnimask finetune {name}")
    toks = model.tokenizers or {}
    ctx = TaskContext(vocab=model.vocab, text=toks.get("text"),
                      pixels=model.cfg.image_input == "pixels", speech=toks.get("speech"))
    t = TASKS.create(name, ctx)
    t.bind(model)
    return t


@contextlib.contextmanager
def evaluating(model):
    """The model in eval mode for the block, its training mode restored after."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def first(corpus, limit: int | None) -> list[int]:
    """The indices an evaluation reads: the first ``limit`` samples (all when None)."""
    n = len(corpus) if limit is None else min(limit, len(corpus))
    return list(range(n))
