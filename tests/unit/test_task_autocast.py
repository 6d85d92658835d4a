"""Every fine-tuning task's training step under bf16 autocast, CUDA's default precision
(run here on the CPU: the same dtype rules), against the same step in fp32."""

from __future__ import annotations

import math

import pytest
import torch

import omnimask
from omnimask.train.corpus import build_corpus
from omnimask.train.data.shards import expand_shards
from omnimask.train.tasks.base import TASKS, TaskContext, task_config


@pytest.fixture(scope="module")
def corpus_and_ctx(tiny_model_dir, shapes_dir):
    model = omnimask.load(tiny_model_dir)
    toks = model.tokenizers
    corpus = build_corpus(expand_shards([str(shapes_dir / "train-*.tar")]), toks["text"],
                          toks["image"], None, progress=False)
    ctx = TaskContext(vocab=model.vocab, text=toks["text"],
                      pixels=model.cfg.image_input == "pixels")
    return corpus, ctx


@pytest.mark.parametrize("name", TASKS.names())
def test_every_task_steps_under_bf16_autocast(name, corpus_and_ctx, tiny_model_dir):
    corpus, ctx = corpus_and_ctx
    task = TASKS.create(name, ctx, task_config(name, None))
    torch.manual_seed(0)
    model = omnimask.load(tiny_model_dir, heads={task.head_name: task.head_config(corpus)})
    task.bind(model)
    model.train()
    b = task.batch(corpus, list(range(8)), torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    with torch.no_grad():
        want = float(task.loss(model, b)["loss"])
    torch.manual_seed(1)
    with torch.autocast("cpu", torch.bfloat16):
        loss = task.loss(model, b)["loss"]
    loss.float().backward()
    got = float(loss.detach())
    assert math.isfinite(got) and abs(got - want) < 0.05 * max(1.0, abs(want)), (got, want)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
