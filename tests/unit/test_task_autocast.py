"""Every fine-tuning task's training step under bf16 autocast, CUDA's default precision
(run here on the CPU: the same dtype rules), against the same step in fp32."""

from __future__ import annotations

import pytest
import torch

import omnimask
from omnimask.train.tasks.base import TASKS, task_config

from .test_objectives import bf16_step_matches_fp32


@pytest.mark.parametrize("name", TASKS.names())
def test_every_task_steps_under_bf16_autocast(name, tiny_task_data, tiny_model_dir):
    corpus, ctx = tiny_task_data
    task = TASKS.create(name, ctx, task_config(name, None))
    torch.manual_seed(0)
    model = omnimask.load(tiny_model_dir, heads={task.head_name: task.head_config(corpus)})
    task.bind(model)
    model.train()
    b = task.batch(corpus, list(range(8)), torch.Generator().manual_seed(0))
    bf16_step_matches_fp32(lambda: task.loss(model, b), model)
