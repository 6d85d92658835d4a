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
                                    "omnimask.train.tasks.caption",
                                    "omnimask.train.tasks.segment"))


def task(name: str, head: str | None = None):
    """Register a task class under ``name`` (also its ``name``); ``head``: the head it runs
    (default: the one of the same name; ``refer`` evaluates the ``segment`` head)."""
    def deco(cls):
        cls.name = name
        cls.head_name = head or name
        return TASKS.register(name)(cls)
    return deco


def pack_blocks(images: list, texts: list[list]) -> dict:
    """Sample k = ``[images[k]][texts[k][0]][texts[k][1]]...`` packed as blocks (mask
    ``blocks``: the image sees itself, each text the image and itself; the image is encoded
    once for all its texts): ``packed``, ``blocks`` and ``cls``, each text's first position."""
    from omnimask.fusion.packing import pack

    samples, cls, start = [], [], 0
    for image, ts in zip(images, texts):
        at = start + len(image)
        for t in ts:
            cls.append(at)
            at += len(t)
        samples.append([image, *ts])
        start = at
    p = pack(samples)
    return {"packed": p, "blocks": p.segment, "cls": torch.tensor(cls, dtype=torch.long)}


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
    head_name = ""  # the model head it trains and runs
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
        return model(batch, task=self.head_name)

    def evaluate(self, model, corpus, limit: int | None = None,
                 examples: Path | None = None) -> dict:
        raise NotImplementedError


def task_config(name: str, given: Any) -> Any:
    """``tasks.<name>`` validated against the task's ``Config`` (errors name the key)."""
    from omnimask.config import load_config
    from omnimask.errors import ConfigError

    cls = TASKS.get(name)
    if cls.Config is None:
        if given:
            raise ConfigError(f"tasks.{name}: this task has no settings")
        return None
    try:
        return load_config(cls.Config, None, **dict(given or {}))
    except ConfigError as e:
        raise ConfigError(f"tasks.{name}: {e}") from None


def task_for(model, name: str, where: str = "this model", settings: dict | None = None) -> Task:
    """Task ``name`` bound to a loaded model (its tokenizers and head settings): what
    ``omnimask eval`` and the Python API run; ``where`` names the model in errors;
    ``settings``: the task's settings (``tasks.<name>``) over its defaults."""
    head = TASKS.get(name).head_name
    if head not in model.heads:
        raise OmnimaskError(f"{where} has no {head} head (its heads: "
                            f"{', '.join(model.heads) or 'none'}); fine-tune one with "
                            f"omnimask finetune {head}")
    toks = model.tokenizers or {}
    ctx = TaskContext(vocab=model.vocab, text=toks.get("text"),
                      pixels=model.cfg.image_input == "pixels", speech=toks.get("speech"))
    t = TASKS.create(name, ctx, task_config(name, settings) if settings else None)
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


def pyplot():
    """matplotlib's pyplot on the Agg backend (example figures are files, never windows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int) -> Path:
    """Write ``fig`` to ``path`` (its folder created) and free it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def first(corpus, limit: int | None) -> list[int]:
    """The indices an evaluation reads: the first ``limit`` samples (all when None)."""
    n = len(corpus) if limit is None else min(limit, len(corpus))
    return list(range(n))
