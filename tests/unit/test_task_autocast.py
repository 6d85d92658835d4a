"""Every fine-tuning task's training step under bf16 autocast, CUDA's default precision
(run here on the CPU: the same dtype rules), against the same step in fp32."""

from __future__ import annotations

import math

import pytest
import torch

import omnimask
from omnimask.train.tasks.base import TASKS, task_config


@pytest.mark.parametrize("name", TASKS.names())
def test_every_task_steps_under_bf16_autocast(name, tiny_task_data, tiny_model_dir):
    corpus, ctx = tiny_task_data
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
