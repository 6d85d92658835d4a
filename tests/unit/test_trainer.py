"""The trainer on a tiny regression model: skips, stops, signals, schedule, EMA, groups, and
the options the small models use (time schedule, Adam, hooks, a stateful data source)."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal

import pytest
import torch
from torch import nn

from omnimask.errors import OmnimaskError
from omnimask.train import checkpoint as ckpt
from omnimask.train.trainer import (
    NonFiniteLoss,
    Trainer,
    TrainerConfig,
    load_weights,
    lr_at,
    make_optimizer,
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


def _trainer(tmp_path, poison=(), cls=None, **kw):
    torch.manual_seed(0)
    m = (cls or Tiny)()
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


@pytest.mark.parametrize("ema", [0.0, 0.5])
def test_resume_equals_unbroken_run(tmp_path, ema):
    full = _trainer(tmp_path / "full", ema=ema)
    full.fit()
    part = _trainer(tmp_path / "part", max_minutes=1e-9, ema=ema)  # stops after one step
    part.fit()
    rest = _trainer(tmp_path / "part", ema=ema)
    rest.fit()
    a = [r["reg"] for r in _rows(tmp_path / "full")]
    b = [r["reg"] for r in _rows(tmp_path / "part")]
    assert a == b and len(a) == 12
    for k, v in weights(full.model).items():
        assert torch.equal(v, weights(rest.model)[k])
    if ema:  # the average resumes too, beside the weights it follows (their device)
        live = weights(rest.model)
        for k, v in full.ema.items():
            assert torch.equal(v, rest.ema[k]) and rest.ema[k].device == live[k].device


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


def _clocked(tmp_path, stop_at=None, **kw):
    """A time-scheduled trainer whose every step takes one second of a fake clock."""
    t = _trainer(tmp_path, **{"schedule_by": "time", "max_steps": 0, "max_minutes": 0.25, **kw})
    now = [0.0]
    t.clock = lambda: now[0]
    inner = t.loss_fn

    def fn(name, b):
        now[0] += 1.0
        if t.step == stop_at:
            os.kill(os.getpid(), signal.SIGUSR2)  # a preemption notice mid-step
        return inner(name, b)

    t.loss_fn = fn
    return t


def test_time_schedule_follows_elapsed_over_budget_and_resumes_on_it(tmp_path):
    full = _clocked(tmp_path / "full")
    assert full.fit()["status"] == "time budget reached"
    rows = _rows(tmp_path / "full")
    assert len(rows) == 15  # 15 s budget, 1 s a step
    cfg = full.cfg
    want = [lr_at(cfg, s, 0, 2, progress=s / 15) for s in range(15)]
    assert [r["lr"] for r in rows] == pytest.approx(want)
    assert want[:2] == [0.005, 0.01]  # warmup by steps, then the cosine by elapsed / budget
    assert want[7] == pytest.approx(0.005 * (1 + math.cos(math.pi * 7 / 15)))
    _, st = ckpt.load(ckpt.latest(tmp_path / "full" / "checkpoints"))
    assert st["schedule"] == {"warmup": 2, "total": 0, "by": "time", "minutes": 0.25}
    # stopped at step 6, resumed with another budget: the checkpoint's budget and clock win
    part = _clocked(tmp_path / "part", stop_at=5)
    assert part.fit()["status"] == "interrupted by SIGUSR2"
    rest = _clocked(tmp_path / "part", max_minutes=5.0)
    assert rest.fit()["step"] == 15
    assert _rows(tmp_path / "part") == rows
    for k, v in weights(full.model).items():
        assert torch.equal(v, weights(rest.model)[k])
    with pytest.raises(ValueError, match="trainer.max_minutes must be > 0 with schedule_by=time"):
        TrainerConfig(schedule_by="time")
    with pytest.raises(ValueError, match="trainer.max_steps must be >= 1 with schedule_by=steps"):
        TrainerConfig(max_steps=0)


def test_optimizer_choice_adam_or_adamw(tmp_path):
    assert type(_trainer(tmp_path / "w").opt) is torch.optim.AdamW
    t = _trainer(tmp_path / "a", optimizer="adam", betas=[0.8, 0.9], max_steps=1,
                 warmup_steps=1, clip=0, weight_decay=0.0)
    assert type(t.opt) is torch.optim.Adam and t.opt.defaults["betas"] == (0.8, 0.9)
    ref = copy.deepcopy(t.model)
    t.fit()
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2, betas=(0.8, 0.9))
    _, b = _batches()(0, 0)
    _loss(ref)("reg", b)["loss"].backward()
    opt.step()
    for k, v in weights(ref).items():
        torch.testing.assert_close(weights(t.model)[k], v)
    with pytest.raises(ValueError, match=r"trainer.optimizer must be adamw\|adam, got 'sgd'"):
        TrainerConfig(optimizer="sgd")


class Layered(Tiny):
    """Tiny with depths: the embedding 0, the linear layer and norm 1, the head on top (2)."""

    def layer_depths(self):
        d = {"emb.weight": 0, "lin.weight": 1, "lin.bias": 1, "norm.weight": 1, "norm.bias": 1}
        return d, 2


def test_layer_decay_scales_each_depths_steps(tmp_path):
    """trainer.layer_decay=0.5: a step equals AdamW's with lr * 0.5 ** (2 - depth) per
    parameter, weight decay still off for vectors and embeddings; 1 keeps two groups."""
    assert len(param_groups(Layered(), 0.01)) == 2
    t = _trainer(tmp_path, cls=Layered, max_steps=1, warmup_steps=1, clip=0,
                 weight_decay=0.1, layer_decay=0.5)
    scales = {id(p): g["lr_scale"] for g in t.opt.param_groups for p in g["params"]}
    assert sorted(scales.values()) == [0.25, 0.5, 0.5, 0.5, 0.5]
    ref = copy.deepcopy(t.model)
    t.fit()
    depth, _ = ref.layer_depths()
    groups = [{"params": [p], "lr": 1e-2 * 0.5 ** (2 - depth[n]),
               "weight_decay": 0.1 if n == "lin.weight" else 0.0}
              for n, p in ref.named_parameters()]
    opt = torch.optim.AdamW(groups, betas=tuple(t.cfg.betas))
    _, b = _batches()(0, 0)
    _loss(ref)("reg", b)["loss"].backward()
    opt.step()
    for k, v in weights(ref).items():
        torch.testing.assert_close(weights(t.model)[k], v, msg=k)
    # resumed with the same decay it trains on; with another it is refused by name
    again = _trainer(tmp_path, cls=Layered, max_steps=2, warmup_steps=1, clip=0,
                     weight_decay=0.1, layer_decay=0.5, extend=True)
    assert again.fit()["step"] == 2
    for other in (1.0, 0.7):
        with pytest.raises(OmnimaskError, match=r"optimizer groups differ from this run's "
                           r"\(trainer.layer_decay"):
            _trainer(tmp_path, cls=Layered, max_steps=3, layer_decay=other, extend=True).fit()
    with pytest.raises(OmnimaskError, match=r"trainer.layer_decay=0.5: Tiny does not name"):
        param_groups(Tiny(), 0.01, 0.5)
    with pytest.raises(ValueError, match=r"trainer.layer_decay must be in \(0, 1\], got 0"):
        TrainerConfig(layer_decay=0)


def test_fused_adamw_takes_the_per_tensor_steps():
    """The trainer's optimizer is fused where it can be; five steps of it equal the
    per-tensor (foreach) implementation's to float32 rounding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 1))
    ref = copy.deepcopy(model)
    cfg = TrainerConfig(weight_decay=0.1, lr=1e-2)
    opt = make_optimizer(cfg, model)
    assert opt.defaults["fused"] is True
    ref_opt = torch.optim.AdamW(param_groups(ref, 0.1), lr=1e-2, betas=tuple(cfg.betas),
                                foreach=True)
    for i in range(5):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(i))
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)


def test_parallelize_wraps_once_before_the_optimizer_and_the_wrapper_trains(tmp_path):
    calls = []

    def parallelize(model):
        calls.append(model)
        return copy.deepcopy(model)  # a wrapper: other parameters than the model given

    torch.manual_seed(0)
    m = Tiny()
    before = copy.deepcopy(weights(m))
    box = {}
    cfg = TrainerConfig(max_steps=4, lr=1e-2, warmup_steps=1, eval_every=0,
                        tensorboard=False, device="cpu")
    t = Trainer(cfg, tmp_path, m, _batches(), lambda n, b: _loss(box["t"].model)(n, b),
                progress=False, parallelize=parallelize)
    box["t"] = t
    assert len(calls) == 1 and calls[0] is m and t.model is not m
    held = {id(p) for g in t.opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in t.model.parameters()}  # built on what parallelize returned
    t.fit()
    assert len(calls) == 1
    assert all(torch.equal(v, before[k]) for k, v in weights(m).items())
    assert not torch.equal(weights(t.model)["lin.weight"], before["lin.weight"])
    _, st = ckpt.load(ckpt.latest(tmp_path / "checkpoints"))
    assert st["step"] == 4


class Source:
    """Batches from its own generator: the state a checkpoint must carry."""

    def __init__(self) -> None:
        self.gen, self.served = torch.Generator().manual_seed(1), 0

    def make_batch(self, step, micro):
        self.served += 1
        x = torch.randn(8, 4, generator=self.gen)
        return "reg", {"x": x, "y": x.sum(1, keepdim=True)}

    def state_dict(self):
        return {"gen": self.gen.get_state(), "served": self.served}

    def load_state_dict(self, st):
        self.gen.set_state(st["gen"])
        self.served = st["served"]


def _sourced(run, **kw):
    torch.manual_seed(0)
    m = Tiny()
    cfg = TrainerConfig(**{"max_steps": 12, "lr": 1e-2, "warmup_steps": 2, "keep": 3,
                           "checkpoint_every": 5, "eval_every": 0, "tensorboard": False,
                           "device": "cpu", **kw})
    return Trainer(cfg, run, m, loss_fn=_loss(m), progress=False, data=Source())


def test_stateful_data_source_state_is_checkpointed_and_restored_exactly(tmp_path):
    full = _sourced(tmp_path / "a")
    full.fit()
    killed = _sourced(tmp_path / "b")
    killed.fit()
    ck = tmp_path / "b" / "checkpoints"
    assert ckpt.load(ck / "step_00000005")[1]["data"]["source"]["served"] == 5
    for p in ckpt.complete(ck)[1:]:  # a kill lost everything after step 5
        shutil.rmtree(p)
    resumed = _sourced(tmp_path / "b")  # a new process: a fresh source
    resumed.fit()
    assert resumed.data.served == 12  # 5 restored + 7 drawn, not 12 + 7
    assert [r["reg"] for r in _rows(tmp_path / "a")] == [r["reg"] for r in _rows(tmp_path / "b")]
    for k, v in weights(full.model).items():
        assert torch.equal(v, weights(resumed.model)[k])
    plain = _trainer(tmp_path / "b")  # the same run resumed without its source
    with pytest.raises(OmnimaskError, match="with a stateful data source, this run has none"):
        plain.fit()
    with pytest.raises(TypeError, match="needs make_batch, state_dict and load_state_dict"):
        Trainer(TrainerConfig(), tmp_path / "c", Tiny(), loss_fn=_loss(Tiny()), data=object())


def test_after_step_sees_each_applied_step_and_adds_to_its_row(tmp_path):
    seen = []

    def after(step, outputs):
        seen.append((step, [tuple(o["ids"].shape) for o in outputs]))
        return {"extra": step * 2} if step % 2 == 0 else None

    torch.manual_seed(0)
    m = Tiny()
    inner = _loss(m)
    cfg = TrainerConfig(max_steps=6, accumulate=2, lr=1e-2, warmup_steps=1, eval_every=0,
                        tensorboard=False, device="cpu")
    Trainer(cfg, tmp_path, m, _batches(poison={3}),
            lambda n, b: {**inner(n, b), "ids": torch.arange(3)},  # not a scalar: not logged
            progress=False, after_step=after).fit()
    assert seen == [(s, [(3,), (3,)]) for s in (1, 2, 3, 5, 6)]  # step 4 was skipped
    rows = _rows(tmp_path)
    assert [r.get("extra") for r in rows] == [None, 4, None, None, None, 12]
    assert all("ids" not in r for r in rows)


def test_signal_handlers_are_restored_when_the_first_evaluation_raises(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    t = _trainer(tmp_path)

    def boom(model):
        raise ValueError("evaluation failed")
    t.evaluate = boom
    with pytest.raises(ValueError, match="evaluation failed"):
        t.fit()
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_finished_run_trains_on_with_extend(tmp_path, caplog):
    assert _trainer(tmp_path, max_steps=6).fit()["step"] == 6
    with caplog.at_level("WARNING"):
        assert _trainer(tmp_path, max_steps=9).fit()["step"] == 6  # the old schedule: done
    assert "trainer.extend=true takes the config's" in caplog.text
    t = _trainer(tmp_path, max_steps=9, extend=True)
    out = t.fit()
    assert out["step"] == 9 and t.schedule["total"] == 9
    assert [r["step"] for r in _rows(tmp_path)] == list(range(1, 10))
    lrs = [r["lr"] for r in _rows(tmp_path)]
    # the cosine is stretched to 9 steps from step 6 on: a higher rate than step 6 had
    assert lrs[6] == pytest.approx(lr_at(t.cfg, 6, 9, 2)) and lrs[6] > lrs[5]


def test_tensorboard_has_one_loss_series_per_objective(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    m = Tiny()
    make = _batches()
    cfg = TrainerConfig(max_steps=6, lr=1e-2, warmup_steps=1, eval_every=0, device="cpu",
                        tensorboard=True, log_every=1)
    (tmp_path / "config.yaml").write_text("trainer:\n  max_steps: 6\n")
    t = Trainer(cfg, tmp_path, m, lambda s, k: ("even" if s % 2 == 0 else "odd",
                                                make(s, k)[1]), _loss(m),
                evaluate=lambda model: {"losses": {"reg": 0.5}}, progress=False)
    t.fit()
    ev = EventAccumulator(str(tmp_path / "tb"))
    ev.Reload()
    tags = ev.Tags()["scalars"]
    assert {"train/loss_by_objective/even", "train/loss_by_objective/odd",
            "train/loss"} <= set(tags)
    assert [e.step for e in ev.Scalars("train/loss_by_objective/odd")] == [2, 4, 6]
    rows = {r["step"]: r["loss"] for r in _rows(tmp_path)}
    for e in ev.Scalars("train/loss_by_objective/even"):
        assert e.value == pytest.approx(rows[e.step])
    # the settings against the last validation (HParams tab), and the run's config as text
    hp = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    hp.Reload()
    assert "_hparams_/session_start_info" in hp.PluginTagToContent("hparams")
    assert [e.value for e in hp.Scalars("hparam/losses/reg")] == [0.5]
    assert "config/text_summary" in hp.Tags()["tensors"]


def test_compile_trains_the_same_weights_and_reports_the_first_step(tmp_path, caplog):
    """trainer.compile=true compiles the trunk's blocks (names unchanged): three steps on
    batches of new lengths give the eager run's weights; the first step's time is logged."""
    from omnimask.fusion.packing import IGNORE, Segment, pack
    from omnimask.fusion.trunk import Trunk, TrunkConfig

    def make(step, micro):
        g = torch.Generator().manual_seed(step_seed(0, step, micro))
        samples = []
        for n in torch.randint(3, 12, (3,), generator=g).tolist():
            ids = torch.randint(0, 30, (n,), generator=g)
            samples.append([Segment("text", ids=ids, targets=ids.where(
                torch.rand(n, generator=g) < 0.5, torch.full_like(ids, IGNORE)))])
        return "mlm", pack(samples)

    final, losses = [], []
    for compiled in (False, True):
        torch.manual_seed(0)
        m = Trunk(TrunkConfig(vocab_size=30, dim=16, heads=2, layers=2, ffn_dim=32,
                              attention_backend="sdpa"))

        def loss(name, b, m=m):
            v = m.mlm_loss(b)
            return {"loss": v, "mlm": v.detach(), "tokens": b.num_tokens}
        cfg = TrainerConfig(max_steps=3, lr=1e-2, warmup_steps=1, eval_every=0,
                            tensorboard=False, device="cpu", compile=compiled)
        with caplog.at_level("INFO", "omnimask.trainer"):
            Trainer(cfg, tmp_path / str(compiled), m, make, loss,
                    evaluate=lambda model: {}, progress=False).fit()
        final.append(weights(m))
        rows = _rows(tmp_path / str(compiled))
        assert ("first_step_s" in rows[0]) == compiled
        losses.append([r["loss"] for r in rows])
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
    assert "trainer.compile: the first step took" in caplog.text
    assert final[0].keys() == final[1].keys()
    for k, v in final[0].items():
        if k.endswith("qkv.bias"):  # the key bias's true gradient is 0: Adam scales noise
            v, final[1][k] = (torch.cat([x[:16], x[32:]]) for x in (v, final[1][k]))
        torch.testing.assert_close(final[1][k], v, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="trainer.compile is not supported with"):
        TrainerConfig(compile=True, parallel="fsdp")


def test_loaded_moments_take_the_parameter_layout(tmp_path):
    """A checkpoint's moments are contiguous; a channels-last conv's are channels-last in a
    fresh run, and the fused kernel steps over both as one layout: loading converts."""
    torch.manual_seed(0)
    m = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    t = Trainer(TrainerConfig(max_steps=1, device="cpu", tensorboard=False, eval_every=0),
                tmp_path, m, lambda s, k: ("c", {"x": torch.randn(2, 3, 5, 5)}),
                lambda n, b: {"loss": m(b["x"]).square().mean(), "c": 0.0, "tokens": 2},
                evaluate=lambda model: {}, progress=False)
    t.fit()
    sd = t.opt.state_dict()
    st = sd["state"][0]
    assert st["exp_avg"].stride() == m.weight.stride() != m.weight.contiguous().stride()
    sd["state"][0] = {k: v.contiguous() for k, v in st.items()}  # as a checkpoint holds them
    t._load_optimizer(sd)
    got = t.opt.state[m.weight]
    assert got["exp_avg"].stride() == got["exp_avg_sq"].stride() == m.weight.stride()
    assert torch.equal(got["exp_avg"], st["exp_avg"])


def test_progress_bar_ends_where_the_time_cap_will(tmp_path):
    """100 steps with a 15 s cap at 1 s a step: the bar's total follows the cap (15 steps),
    so its ETA is the time left; without a cap it stays at max_steps."""
    capped = _clocked(tmp_path / "c", schedule_by="steps", max_steps=100, log_every=5)
    assert capped.fit()["status"] == "time budget reached"
    assert capped.bar.total == 15
    free = _clocked(tmp_path / "f", schedule_by="steps", max_steps=20, max_minutes=0.0,
                    log_every=5)
    free.fit()
    assert free.bar.total == 20


def test_figures_and_text_reach_tensorboard_with_or_without_an_open_writer(tmp_path):
    """``tb_add``: a PNG as an image and Markdown as text, through a new writer on run/tb
    (after training) and through the trainer's own."""
    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from omnimask.train.trainer import tb_add

    Image.fromarray(np.full((10, 30, 3), 200, np.uint8)).save(tmp_path / "f.png")
    tb_add(tmp_path, 7, {"samples/figure": tmp_path / "f.png"}, {"samples/captions": "| a |"})
    w = SummaryWriter(str(tmp_path / "tb"))
    tb_add(tmp_path, 9, {"examples/vqa": tmp_path / "f.png"}, writer=w)
    w.close()
    ev = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "tensors": 0})
    ev.Reload()
    (img,) = ev.Images("samples/figure")
    assert (img.step, img.width, img.height) == (7, 30, 10)
    assert [e.step for e in ev.Images("examples/vqa")] == [9]
    (txt,) = ev.Tensors("samples/captions/text_summary")
    assert txt.tensor_proto.string_val[0].decode() == "| a |"


def test_validation_before_the_first_step_is_optional_and_the_end_still_validates(tmp_path):
    for first in (True, False):
        run = tmp_path / str(first)
        out = _trainer(run, eval_first=first, max_steps=4)
        out.fit()
        assert [r["step"] for r in _rows(run, "val")] == ([0, 4] if first else [4])
        # the same training either way: validation draws nothing from the batches' RNGs
        assert [r["loss"] for r in _rows(run)] == [r["loss"] for r in _rows(tmp_path / "True")]


@pytest.mark.parametrize("native", [True, False])
def test_bf16_asked_of_a_cpu_that_emulates_it_is_warned_by_setting(tmp_path, native, caplog,
                                                                    monkeypatch):
    """Emulated bf16 runs ~100x slower than fp32: a setting that asks for it is named."""
    from omnimask.modalities.image.tokenizer import conv_dtype
    from omnimask.train import trainer

    monkeypatch.setattr(trainer, "native_bf16", lambda device: native)
    caplog.set_level("WARNING", logger="omnimask.trainer")
    assert conv_dtype("bf16", "cpu", "encoder_warmup.precision") == torch.bfloat16
    assert conv_dtype("auto", "cpu", "encoder_warmup.precision") == (
        torch.bfloat16 if native else None)
    _trainer(tmp_path / "a", precision="bf16")
    _trainer(tmp_path / "b", precision="auto")
    warned = [r.getMessage() for r in caplog.records]
    if native:
        assert warned == []
    else:  # once per setting that names bf16, never for auto
        assert len(warned) == 2, warned
        assert warned[0].startswith("encoder_warmup.precision=bf16: this CPU has no native bf16")
        assert warned[1].startswith("trainer.precision=bf16: this CPU has no native bf16")


def test_rng_state_resumes_where_fewer_gpus_are_visible(monkeypatch):
    """A checkpoint saved with 4 GPUs visible restores the states of the 2 seen now (setting
    all 4 would raise: no generator for GPU 2)."""
    from omnimask.train import trainer as T

    st = T.rng_state()
    st["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]
    got = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: got.extend(states))
    T.set_rng_state(st)
    assert [int(s[0]) for s in got] == [0, 1]
