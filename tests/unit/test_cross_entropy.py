"""The fused vocabulary projection + cross-entropy equals the composed one: loss and every
gradient, in float64 (1e-12) and float32 (1e-5), with ignored targets and weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from omnimask.fusion.cross_entropy import linear_cross_entropy
from omnimask.fusion.packing import IGNORE, Segment, pack
from omnimask.fusion.trunk import Trunk, TrunkConfig


def _inputs(dtype, n=23, dim=16, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, dim, generator=g, dtype=dtype) * 3).requires_grad_()
    w = torch.randn(vocab, dim, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(vocab, generator=g, dtype=dtype).requires_grad_()
    t = torch.randint(vocab, (n,), generator=g)
    t[[2, 7]] = IGNORE
    t[5] = t[4]  # two rows with one target
    return h, w, b, t, torch.rand(n, generator=g, dtype=dtype) + 0.1


def _reference(h, w, b, t, weights=None):
    if weights is None:
        return F.cross_entropy(F.linear(h, w, b), t, ignore_index=IGNORE)
    keep = t != IGNORE
    nll = F.cross_entropy(F.linear(h, w, b), t.masked_fill(~keep, 0), reduction="none")
    return (nll * weights * keep).sum() / (weights * keep).sum()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_equals_composed(dtype, tol, weighted, bias):
    h, w, b, t, wt = _inputs(dtype)
    b = b if bias else None
    params = [p for p in (h, w, b) if p is not None]
    out = []
    for fn in (linear_cross_entropy, _reference):
        loss = fn(h, w, b, t, wt if weighted else None) * 1.7  # a non-unit upstream gradient
        out.append((loss.detach(), torch.autograd.grad(loss, params)))
    (l_fused, g_fused), (l_ref, g_ref) = out
    torch.testing.assert_close(l_fused, l_ref, atol=tol, rtol=tol)
    for a, r in zip(g_fused, g_ref, strict=True):
        torch.testing.assert_close(a, r, atol=tol, rtol=tol)
    assert g_fused[0][[2, 7]].abs().max() == 0  # ignored rows get no gradient


def test_only_needed_gradients_and_one_backward():
    h, w, b, t, _ = _inputs(torch.float64)
    w.requires_grad_(False)
    loss = linear_cross_entropy(h, w, b, t)
    loss.backward(retain_graph=True)
    assert w.grad is None and h.grad is not None and b.grad is not None
    with pytest.raises(RuntimeError, match="runs once"):
        loss.backward()


def test_autocast_falls_back_to_the_composed_loss():
    h, w, b, t, _ = _inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = linear_cross_entropy(h, w, b, t)
        ref = F.cross_entropy(F.linear(h, w, b).float(), t, ignore_index=IGNORE)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, ref)


def test_bad_shapes_are_refused():
    h, w, b, t, _ = _inputs(torch.float32)
    with pytest.raises(ValueError, match=r"h \[N, dim\] and target \[N\]"):
        linear_cross_entropy(h, w, b, t[:-1])


@pytest.mark.parametrize("prenorm", [True, False])
def test_trunk_mlm_loss_equals_the_unfused_head(prenorm):
    """Trunk.mlm_loss (fused) = cross-entropy of mlm_logits: loss and every parameter's
    gradient, float64."""
    torch.manual_seed(0)
    t = Trunk(TrunkConfig(vocab_size=61, dim=32, heads=4, layers=2, ffn_dim=48,
                          prenorm=prenorm, attention_backend="sdpa")).double().train()
    g = torch.Generator().manual_seed(1)
    samples = []
    for n in (5, 11, 8):
        ids = torch.randint(5, 61, (n,), generator=g)
        tg = ids.where(torch.rand(n, generator=g) < 0.4, torch.full_like(ids, IGNORE))
        tg[0] = ids[0]
        samples.append([Segment("text", ids=ids, targets=tg)])
    batch = pack(samples)
    grads = []
    for fused in (True, False):
        t.zero_grad()
        if fused:
            loss = t.mlm_loss(batch)
        else:
            pos = batch.target_positions
            loss = F.cross_entropy(t.mlm_logits(t(batch), pos), batch.targets[pos])
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in t.named_parameters()
                                      if p.grad is not None}))
    (l_f, g_f), (l_r, g_r) = grads
    torch.testing.assert_close(l_f, l_r, atol=1e-12, rtol=1e-12)
    assert g_f.keys() == g_r.keys()
    for n in g_r:
        torch.testing.assert_close(g_f[n], g_r[n], atol=1e-10, rtol=1e-10, msg=n)
