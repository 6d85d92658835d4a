"""The trainer on a tiny regression model: skips, stops, signals, schedule, EMA, groups."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from torch import nn

from omnimask.train import checkpoint as ckpt
from omnimask.train.trainer import (
    NonFiniteLoss,
    Trainer,
    TrainerConfig,
    load_weights,
    lr_at,
    param_groups,
    step_seed,
    weights,
)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.lin = nn.Linear(4, 1)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.emb.weight  # tied, as the trunk's vocabulary head


def _batches(poison=()):
    def make(step, micro):
        g = torch.Generator().manual_seed(step_seed(0, step, micro))
        x = torch.randn(8, 4, generator=g)
        if step in poison:
            x[0, 0] = float("nan")  # a NaN-producing input
        return "reg", {"x": x, "y": x.sum(1, keepdim=True)}
    return make


def _loss(model):
    def fn(name, b):
        h = model.norm(b["x"]) + model.emb.weight[:1]
        loss = ((model.lin(h) - b["y"]) ** 2).mean()
        return {"loss": loss, "reg": loss.detach(), "tokens": 8}
    return fn


def _trainer(tmp_path, poison=(), **kw):
    torch.manual_seed(0)
    m = Tiny()
    cfg = TrainerConfig(**{"max_steps": 12, "lr": 1e-2, "warmup_steps": 2,
                           "checkpoint_every": 5, "eval_every": 0, "tensorboard": False,
                           "device": "cpu", **kw})  # CPU semantics (exact), on any machine
    return Trainer(cfg, tmp_path, m, _batches(poison), _loss(m),
                   evaluate=lambda model: {"losses": {"reg": 0.0}}, progress=False)


def _rows(run, split="train"):
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(ln)["split"] == split]


def test_nan_batch_is_skipped_and_counted_then_repeated_nans_stop(tmp_path):
    t = _trainer(tmp_path / "a", poison={3}, max_steps=8)
    out = t.fit()
    rows = _rows(tmp_path / "a")
    assert out["status"] == "done" and out["nonfinite_skipped"] == 1
    assert rows[3]["skipped"] and "reg" not in rows[3]
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    # from step 6 on every batch is poisoned: stop after max_nonfinite in a row
    t2 = _trainer(tmp_path / "b", poison=set(range(6, 100)), max_nonfinite=3)
    before = {k: v.clone() for k, v in weights(t2.model).items()}
    with pytest.raises(NonFiniteLoss, match=r"3 non-finite losses in a row up to step 9 .*"
                                            r"step_00000005"):
        t2.fit()
    last = ckpt.latest(tmp_path / "b" / "checkpoints")
    assert last.name == "step_00000005"  # the last good checkpoint is intact and loadable
    sd, st = ckpt.load(last)
    assert st["step"] == 5 and all(torch.isfinite(v).all() for v in sd.values())
    assert any(not torch.equal(before[k], sd[k]) for k in sd)  # it had trained


def test_signal_saves_at_the_next_step_boundary(tmp_path):
    t = _trainer(tmp_path)
    inner = t.make_batch

    def make(step, micro):
        if step == 4:
            os.kill(os.getpid(), signal.SIGUSR2)  # preemption notice mid-step
        return inner(step, micro)

    t.make_batch = make
    out = t.fit()
    assert out["status"] == "interrupted by SIGUSR2" and out["step"] == 5
    assert ckpt.latest(tmp_path / "checkpoints").name == "step_00000005"
    # resume=auto continues from there to the end with the stored schedule
    t2 = _trainer(tmp_path, max_steps=99)
    assert t2.fit()["step"] == 12  # total length from the checkpoint, not max_steps=99


def test_resume_equals_unbroken_run(tmp_path):
    full = _trainer(tmp_path / "full")
    full.fit()
    part = _trainer(tmp_path / "part", max_minutes=1e-9)  # stops at once after one step
    part.fit()
    rest = _trainer(tmp_path / "part")
    rest.fit()
    a = [r["reg"] for r in _rows(tmp_path / "full")]
    b = [r["reg"] for r in _rows(tmp_path / "part")]
    assert a == b and len(a) == 12
    for k, v in weights(full.model).items():
        assert torch.equal(v, weights(rest.model)[k])


def test_schedule_warmup_then_cosine():
    cfg = TrainerConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    lrs = [lr_at(cfg, s, 14, 4) for s in range(15)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0) and lrs[9] == pytest.approx(0.55)
    assert lrs[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_no_weight_decay_on_norms_biases_embeddings():
    m = Tiny()
    decay, no = param_groups(m, 0.01)
    assert {id(p) for p in decay["params"]} == {id(m.lin.weight)}
    assert {id(p) for p in no["params"]} == {id(m.emb.weight), id(m.lin.bias),
                                             id(m.norm.weight), id(m.norm.bias)}
    assert no["weight_decay"] == 0.0 and decay["weight_decay"] == 0.01


def test_tied_weights_round_trip_through_safetensors(tmp_path):
    m = Tiny()
    assert "head.weight" not in weights(m) or "emb.weight" not in weights(m)
    ckpt.save(tmp_path, 1, weights(m), {})
    m2 = Tiny()
    sd, _ = ckpt.load(ckpt.latest(tmp_path))
    load_weights(m2, sd, "test")
    assert torch.equal(m2.head.weight, m.emb.weight) and m2.head.weight is m2.emb.weight


def test_ema_tracks_the_weights(tmp_path):
    t = _trainer(tmp_path, ema=0.5, max_steps=3)
    snaps = []
    orig = t._update_ema

    def spy():
        orig()
        snaps.append({k: v.detach().clone() for k, v in weights(t.model).items()})

    t._update_ema = spy
    init = {k: v.detach().clone().float() for k, v in weights(t.model).items()}
    t.fit()
    want = init["lin.weight"]
    for s in snaps:
        want = 0.5 * want + 0.5 * s["lin.weight"]
    torch.testing.assert_close(t.ema["lin.weight"], want)


def test_accumulation_equals_one_big_batch(tmp_path):
    """Two micro-batches of the same data = one step on their mean loss."""
    grads = []
    for acc in (1, 2):
        torch.manual_seed(0)
        m = nn.Linear(4, 1)
        x = torch.randn(8, 4)

        def make(step, micro, x=x, acc=acc):
            part = x if acc == 1 else x[micro * 4:(micro + 1) * 4]
            return "reg", {"x": part}

        def fn(name, b, m=m):
            return {"loss": (m(b["x"]) ** 2).mean()}

        seen = []
        m.weight.register_hook(lambda g, seen=seen: seen.append(g.clone()))
        cfg = TrainerConfig(max_steps=1, accumulate=acc, lr=0.1, warmup_steps=1, clip=0,
                            weight_decay=0.0, tensorboard=False, eval_every=0,
                            checkpoint_every=100)
        Trainer(cfg, tmp_path / str(acc), m, make, fn, progress=False).fit()
        assert len(seen) == acc
        grads.append(sum(seen))
    torch.testing.assert_close(grads[0], grads[1])
