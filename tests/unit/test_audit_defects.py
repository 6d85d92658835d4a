"""Pretraining defects found by the audit (issue 13, item 5), each reproduced on a tiny model:
masked inputs through a zero-variance LayerNorm, EMA evaluation with a tied embedding,
objectives drawn per micro-batch, weight decay on embedding tables, speech mask coverage."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from omnimask.train.objectives.base import OBJECTIVES, ObjectivesConfig
from omnimask.train.pretrain import PretrainConfig, Pretraining
from omnimask.train.trainer import Trainer, TrainerConfig, param_groups

from .test_objectives import _corpus, _ctx, _model

ROOT = Path(__file__).resolve().parents[2]


def _grad_norm(model, loss) -> float:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return float(torch.stack([p.grad.norm() for p in model.parameters()
                              if p.grad is not None]).norm())


@pytest.mark.parametrize("name", ["mrfr", "mim", "speech"])
def test_masked_inputs_keep_the_gradient_norm_at_initialisation(name):
    """A masked feature used to be zeroed before the projection and LayerNorm (eps 1e-12):
    a zero-variance vector, whose gradient into the input bias was ~1e5-1e6 times the
    unmasked one. Now the same loss has a gradient of the same order with or without the
    masking, and nothing of a masked feature reaches the trunk."""
    ctx, c = _ctx(), _corpus()
    obj = OBJECTIVES.create(name, ctx)
    b = obj.batch(c, list(range(8)), torch.Generator().manual_seed(0))
    model = _model(ctx)
    masked = _grad_norm(model, obj.loss(model, b)["loss"])
    encode = model.encoder.forward
    model.encoder.forward = lambda p, **kw: encode(p, **{k: v for k, v in kw.items()
                                                         if k != "masked"})
    unmasked = _grad_norm(model, obj.loss(model, b)["loss"])
    del model.encoder.forward
    assert 0.2 < masked / unmasked < 5, (masked, unmasked)
    # masked features are replaced: changing them changes no hidden state
    p, m = b["packed"], b["masked"]
    mod = "speech" if name == "speech" else "image"
    feats = dict(p.features)
    feats[mod] = feats[mod].masked_fill(m[mod][:, None], 7.0)
    with torch.no_grad():
        h1 = model.encoder(p, masked=m)
        h2 = model.encoder(replace(p, features=feats), masked=m)
    torch.testing.assert_close(h1, h2)


def test_evaluation_with_ema_uses_every_ema_weight_including_the_tied_embedding(tmp_path):
    """The vocabulary head's embedding aliases the token embedding; loading
    ``{**live, **ema}`` let the live alias overwrite the EMA token embedding."""
    ctx = _ctx()
    model = _model(ctx)
    trunk = model.encoder.trunk
    assert trunk.mlm.embedding.weight is trunk.tok.weight
    seen = {}

    def evaluate(m):
        seen.update({k: v.detach().clone() for k, v in m.state_dict().items()})
        return {"losses": {}}

    cfg = TrainerConfig(ema=0.9, tensorboard=False, device="cpu")
    t = Trainer(cfg, tmp_path, model, lambda s, k: ("x", {}), lambda n, b: {}, evaluate,
                progress=False)
    g = torch.Generator().manual_seed(0)
    for v in t.ema.values():  # an EMA that differs from the live weights everywhere
        v.add_(torch.rand(v.shape, generator=g) + 0.5)
    live = {k: v.detach().clone() for k, v in model.state_dict().items()}
    t.run_eval()
    alias = {"encoder.trunk.mlm.embedding.weight": "encoder.trunk.tok.weight"}
    assert set(alias) <= set(seen) and not set(alias) & set(t.ema)
    for k, v in seen.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, t.ema[alias.get(k, k)], msg=k)
    for k, v in model.state_dict().items():  # the live weights are back afterwards
        assert torch.equal(v, live[k]), k


def _pretraining(mix: dict[str, float], accumulate: int) -> Pretraining:
    """A Pretraining with only what ``make_batch`` reads (no tokenizers, no shards)."""
    ctx = _ctx(mix=mix)
    pt = Pretraining.__new__(Pretraining)
    pt.cfg = PretrainConfig(objectives=ctx.cfg,
                            trainer=TrainerConfig(batch_size=4, accumulate=accumulate))
    pt.names = sorted(mix)
    pt.objectives = {n: OBJECTIVES.create(n, ctx) for n in pt.names}
    pt.train = _corpus(n=24)
    return pt


def test_micro_batches_of_one_step_share_the_objective_and_differ_in_samples():
    pt = _pretraining({"mlm": 1.0, "mim": 1.0, "speech": 1.0}, accumulate=3)
    drawn = set()
    for step in range(12):
        batches = [pt.make_batch(step, micro) for micro in range(3)]
        names = {n for n, _ in batches}
        assert len(names) == 1, (step, names)
        drawn |= names
        ids = [b["packed"].ids for _, b in batches]
        assert not any(torch.equal(ids[0], x) for x in ids[1:]), step
    assert len(drawn) > 1  # the schedule is mixed across steps
    assert pt.make_batch(5, 0)[0] == pt.make_batch(5, 2)[0]  # a function of the step


def test_no_embedding_table_of_the_pretraining_model_decays():
    """Only the matrices of linear maps and convolutions decay; every ``nn.Embedding`` and
    the plain-Parameter tables (HuBERT's unit embeddings, the mask embeddings) do not."""
    model = _model(_ctx())
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): k for k, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed == {f"{n}.weight" for n, m in model.named_modules()
                       if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d))}
    tables = {"heads.speech.embed", "encoder.embedders.image.mask_embed",
              "encoder.embedders.speech.mask_embed"} | {
        f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    assert "encoder.trunk.tok.weight" in tables and tables <= set(names.values())
    assert not decayed & tables
    assert {id(p) for p in no_decay["params"]} >= {id(model.heads["speech"].embed)}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def _coverage(cfg: ObjectivesConfig, lengths, draws: int = 40) -> float:
    """Share of speech frames the speech objective masks, over many draws."""
    ctx = _ctx(speech_start_prob=cfg.speech_start_prob, speech_span=cfg.speech_span)
    c, g = _corpus(n=len(lengths)), torch.Generator().manual_seed(0)
    c.speech = [torch.zeros(n, 12) for n in lengths]
    c.units = [torch.randint(0, 16, (n,), generator=g) for n in lengths]
    obj = OBJECTIVES.create("speech", ctx)
    masks = [obj.batch(c, list(range(len(lengths))), g)["masked"]["speech"]
             for _ in range(draws)]
    return float(torch.cat(masks).float().mean())


def test_speech_masking_covers_half_of_the_frames_by_default():
    """HuBERT / wav2vec2 mask about half of the frames (wav2vec2: mask_prob 0.65, spans
    of 10); the objective's default covers 0.5 +- 0.05 of short and long utterances."""
    for lengths in ([40, 60, 80, 100], [300, 500]):
        assert abs(_coverage(ObjectivesConfig(), lengths) - 0.5) <= 0.05, lengths


def test_shapes_tiny_sets_its_speech_masking_explicitly():
    """The tiny config masks ~35% with spans of 5; it names its start probability, so a
    change of the default does not change it silently."""
    cfg = yaml.safe_load((ROOT / "configs/pretrain/shapes_tiny.yaml").read_text())
    oc = cfg["objectives"]
    assert "speech_start_prob" in oc and "speech_span" in oc
    cov = _coverage(ObjectivesConfig(speech_start_prob=oc["speech_start_prob"],
                                     speech_span=oc["speech_span"]), [60, 80, 100])
    assert 0.3 <= cov <= 0.55
