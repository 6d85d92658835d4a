"""Packed attention equals each sample alone, for every mask kind and available backend."""

import logging

import pytest
import torch

from omnimask.fusion import attention as A

CUDA = torch.cuda.is_available()
BACKENDS = ["sdpa", "flex"] + (["varlen", "xformers"] if CUDA else [])
CUDA_ONLY = {"varlen": torch.bfloat16, "xformers": torch.bfloat16}  # flash kernels: half only


def _problem(lengths, h=3, d=8, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.randn(sum(lengths), h, d, generator=g).to(device, dtype) for _ in range(3))
    return q, k, v, cu


def _pre(mask, lengths, prefix):
    """The ``prefix_len`` argument of a mask: prefix lengths, block ids [T] or None."""
    if mask == "prefix":
        return prefix
    if mask == "blocks":  # per sample: a context, then blocks (some interleaved)
        g = torch.Generator().manual_seed(len(lengths))
        return torch.cat([torch.randint(0, 4, (n,), generator=g) for n in lengths])
    return None


def _alone(pre, mask, b, s, e):
    """Sample b's own ``prefix_len``."""
    if pre is None:
        return None
    return pre[s:e] if mask == "blocks" else [pre[b]]


def _setting(backend):
    """(device, dtype, tolerance) a backend is tested in: the CUDA-only ones in bf16."""
    if backend == "xformers":
        pytest.importorskip("xformers.ops")
    if backend in CUDA_ONLY:
        return "cuda", CUDA_ONLY[backend], 2e-2
    return ("cuda" if CUDA and backend == "flex" else "cpu"), torch.float32, 1e-5


@pytest.mark.parametrize("mask", A.MASKS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_equals_per_sample(mask, backend):
    lengths = [1, 7, 3, 12]
    dev, dtype, tol = _setting(backend)
    q, k, v, cu = _problem(lengths, device=dev, dtype=dtype)
    pre = _pre(mask, lengths, [1, 3, 2, 5])
    try:
        got = A.attention(q, k, v, cu, max(lengths), mask, pre, backend=backend)
    except NotImplementedError:
        pytest.skip(f"{backend} has no {mask} mask")
    want = A.reference(q.float(), k.float(), v.float(), cu, mask, pre)
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    # and each sample alone through the same backend gives the same rows
    for b, n in enumerate(lengths):
        s, e = int(cu[b]), int(cu[b + 1])
        alone = A.attention(q[s:e], k[s:e], v[s:e], torch.tensor([0, n], dtype=torch.int32), n,
                            mask, _alone(pre, mask, b, s, e), backend=backend)
        torch.testing.assert_close(got[s:e].float(), alone.float(), atol=tol, rtol=tol)


def test_masks_do_what_they_say():
    m = A.block_mask([3, 2], "causal")[:, 0]
    assert m[0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert m[1, :2, :2].tolist() == [[True, False], [True, True]]
    assert not m[1, :2, 2].any()  # no attention to padding
    p = A.block_mask([4], "prefix", [2])[0, 0]
    assert p.tolist() == [[True, True, False, False], [True, True, False, False],
                          [True, True, True, False], [True, True, True, True]]
    assert torch.equal(A.block_mask([4], "cm3"), A.block_mask([4], "causal"))


def test_future_tokens_do_not_leak():
    q, k, v, cu = _problem([6])
    out = A.attention(q, k, v, cu, 6, "causal", backend="sdpa")
    v2 = v.clone()
    v2[4:] += 100.0
    out2 = A.attention(q, k, v2, cu, 6, "causal", backend="sdpa")
    assert torch.equal(out[:4], out2[:4]) and not torch.equal(out[4:], out2[4:])


def test_auto_probe_logs_and_survives_missing_xformers(caplog, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_xformers(name, *a, **kw):
        if name.startswith("xformers"):
            raise ImportError("xformers is broken here")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_xformers)
    monkeypatch.setattr(A, "_CHOICE", {})
    q, k, v, cu = _problem([3, 4])
    with caplog.at_level(logging.INFO, logger="omnimask.attention"):
        out = A.attention(q, k, v, cu, 4, "bidirectional")
    assert "attention backend for cpu/float32/bidirectional: sdpa" in caplog.text
    torch.testing.assert_close(out, A.reference(q, k, v, cu), atol=1e-5, rtol=1e-5)


def test_bad_arguments():
    q, k, v, cu = _problem([3])
    with pytest.raises(ValueError, match="unknown mask"):
        A.attention(q, k, v, cu, 3, "diagonal")
    with pytest.raises(ValueError, match="unknown attention backend"):
        A.attention(q, k, v, cu, 3, backend="flash9")
    with pytest.raises(ValueError, match="prefix_len"):
        A.attention(q, k, v, cu, 3, "prefix", backend="sdpa")


@pytest.mark.parametrize("mask", ["bidirectional", "prefix", "blocks"])
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_gradients_match_reference(mask, backend):
    dev, _, _ = _setting(backend)
    q, k, v, cu = _problem([2, 5, 4], device=dev)
    pre = _pre(mask, [2, 5, 4], [1, 2, 4])
    if backend == "flex" and not CUDA:
        xs = [t.clone().requires_grad_() for t in (q, k, v)]
        with pytest.raises(NotImplementedError, match="no backward on CPU"):
            A.attention(*xs, cu, 5, mask, pre, backend="flex")
        return
    grads = []
    for fn in (lambda *x: A.attention(*x, cu, 5, mask, pre, backend=backend),
               lambda *x: A.reference(*x, cu, mask, pre)):
        xs = [t.clone().requires_grad_() for t in (q, k, v)]
        (fn(*xs) * torch.arange(xs[0].numel(), device=dev).view_as(xs[0]).sin()).sum().backward()
        grads.append([x.grad for x in xs])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mask", A.MASKS)
def test_math_attention_equals_reference(mask):
    q, k, v, cu = _problem([3, 8, 1])
    pre = _pre(mask, [3, 8, 1], [2, 3, 1])
    torch.testing.assert_close(A.math_attention(q, k, v, cu, mask, pre), A.reference(q, k, v, cu, mask, pre),
                               atol=1e-5, rtol=1e-5)


def test_cross_attention_per_query_masks():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(4, 2, 8, generator=g), torch.randn(6, 2, 8, generator=g), torch.randn(6, 2, 8, generator=g)
    allowed = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1], [0] * 6, [1] * 6], dtype=torch.bool)
    out = A.cross_attention(q, k, v, allowed)
    assert torch.isfinite(out).all()
    for i in range(4):
        keep = allowed[i] if allowed[i].any() else torch.ones(6, dtype=torch.bool)
        att = (q[i][:, None] * k.transpose(0, 1)).sum(-1) / 8 ** 0.5  # [H, Tk]
        att = att.masked_fill(~keep, float("-inf")).softmax(-1)
        want = (att[..., None] * v.transpose(0, 1)).sum(1)  # [H, D]
        torch.testing.assert_close(out[i], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], v[5])  # one allowed key: its value exactly


def test_blocks_mask_what_it_says():
    """Context (block 0) sees only itself; block k sees the context and itself."""
    blk = torch.tensor([0, 0, 1, 2, 1] + [1, 0])
    m = A.block_mask([5, 2], "blocks", blk)[:, 0]
    assert m[0].int().tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 1],
                                   [1, 1, 0, 1, 0], [1, 1, 1, 0, 1]]
    assert m[1, :2, :2].int().tolist() == [[1, 1], [0, 1]]  # no context before: still fine
    assert not m[1, :2, 2:].any()


@pytest.mark.parametrize("backend", ["sdpa", "flex"] + (["math"]))
def test_blocks_equal_context_plus_block_alone(backend):
    """Each block's outputs = [context + that block] as one bidirectional sample; the
    context's outputs do not move when a block's tokens change."""
    dev = "cuda" if CUDA and backend == "flex" else "cpu"
    blk = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3] + [0, 1, 0, 2, 1])
    lengths = [9, 5]
    q, k, v, cu = _problem(lengths, device=dev)

    def run(q, k, v, cu, mask, pre):
        if backend == "math":
            return A.math_attention(q, k, v, cu, mask, pre)
        return A.attention(q, k, v, cu, None, mask, pre, backend=backend)

    out = run(q, k, v, cu, "blocks", blk)
    torch.testing.assert_close(out, A.reference(q, k, v, cu, "blocks", blk), atol=1e-5, rtol=1e-5)
    for b, n in enumerate(lengths):
        s = int(cu[b])
        ids = blk[s:s + n]
        for j in ids.unique().tolist():
            if j == 0:
                continue
            sel = s + ((ids == 0) | (ids == j)).nonzero(as_tuple=True)[0].to(dev)
            alone = run(q[sel], k[sel], v[sel], torch.tensor([0, sel.numel()], dtype=torch.int32),
                        "bidirectional", None)
            mine = ids[(ids == 0) | (ids == j)] == j
            torch.testing.assert_close(out[sel][mine.to(dev)], alone[mine.to(dev)], atol=1e-5, rtol=1e-5)
    k2, v2 = k.clone(), v.clone()
    k2[blk.to(dev) == 2] += 3.0
    v2[blk.to(dev) == 2] -= 5.0
    out2 = run(q, k2, v2, cu, "blocks", blk)
    keep = (blk != 2).to(dev)
    torch.testing.assert_close(out2[keep], out[keep], atol=1e-6, rtol=1e-6)  # others unmoved
    assert not torch.allclose(out2[~keep], out[~keep])


def test_blocks_bad_ids_and_unsupported_backends(monkeypatch):
    q, k, v, cu = _problem([3, 2])
    for bad, what in [(None, "needs prefix_len"), ([0, 1], "one per packed position"),
                      (torch.tensor([0.0, 1, 1, 0, 1]), "integer block ids"),
                      (torch.tensor([0, 1, -1, 0, 1]), ">= 0")]:
        with pytest.raises(ValueError, match=what):
            A.attention(q, k, v, cu, 3, "blocks", bad, backend="sdpa")
    for name in ("varlen", "xformers"):  # the probe skips them: they raise NotImplementedError
        fake = type("M", (), {"varlen_attn": lambda *a, **kw: None})
        monkeypatch.setitem(__import__("sys").modules, "torch.nn.attention.varlen", fake)
        with pytest.raises((NotImplementedError, ImportError)):
            A._IMPL[name](q, k, v, A.Layout(cu, "blocks", torch.tensor([0, 1, 1, 0, 1])), None)


def test_probe_picks_a_backend_for_blocks(monkeypatch):
    monkeypatch.setattr(A, "_CHOICE", {})
    assert A.choose_backend(torch.device("cpu"), torch.float32, "blocks") == "sdpa"


@pytest.mark.parametrize("mask", A.MASKS)
@pytest.mark.parametrize("lengths", [[1, 7, 3, 12], [6, 6, 6]])
def test_fast_paths_and_query_rows_match_reference_in_float64(mask, lengths):
    """The SDPA paths (a view for equal lengths, one call per sample, padded with a mask) and
    queries at a subset of rows give the reference's outputs and gradients to 1e-6."""
    q, k, v, cu = _problem(lengths, dtype=torch.float64)
    pre = _pre(mask, lengths, [1, 3, 2, 5][:len(lengths)])
    g = torch.Generator().manual_seed(1)
    rows = torch.rand(sum(lengths), generator=g).lt(0.4).nonzero()[:, 0]
    rows = torch.cat([rows, torch.tensor([sum(lengths) - 1])]).unique()  # sorted, not empty
    weight = torch.randn(sum(lengths), *q.shape[1:], generator=g, dtype=torch.float64)
    results = []
    for fn in (lambda a, b, c: A.attention(a[rows], b, c, cu, None, mask, pre, backend="sdpa",
                                           rows=rows),
               lambda a, b, c: A.attention(a, b, c, cu, None, mask, pre, backend="sdpa")[rows],
               lambda a, b, c: A.reference(a, b, c, cu, mask, pre)[rows]):
        xs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*xs)
        (out * weight[rows]).sum().backward()
        results.append([out, *(x.grad for x in xs)])
    for got in results[:2]:
        for a, b in zip(got, results[2]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mask", A.MASKS)
@pytest.mark.parametrize("lengths", [[1, 7, 3, 12], [6, 6, 6]])
@pytest.mark.parametrize("autocast", [False, True])
def test_cpu_bf16_attention_is_the_fp32_attention_of_its_inputs(mask, lengths, autocast):
    """On CPU, bf16 q/k/v are attended in fp32 (under autocast too, which would cast SDPA's
    inputs to bf16) and the output rounded once to bf16; gradients come back in bf16, each
    the fp32 gradient rounded."""
    q, k, v, cu = _problem(lengths, dtype=torch.bfloat16)
    pre = _pre(mask, lengths, [1, 3, 2, 5][:len(lengths)])
    # bf16-exact weights: both runs' output gradients hold the same values
    weight = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).bfloat16().float()
    outs = []
    for dtype in (torch.bfloat16, torch.float32):
        xs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast and dtype != torch.float32):
            out = A.attention(*xs, cu, None, mask, pre, backend="sdpa")
        (out.float() * weight).sum().backward()
        outs.append([out, *(x.grad for x in xs)])
    for got, want in zip(*outs):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want.to(torch.bfloat16), atol=0, rtol=0)


def _fake_varlen(keyword_only: bool):
    """A CPU ``varlen_attn`` in one of the two signatures torch has shipped, computing the
    reference (what the flash kernel computes)."""
    def run(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        assert cu_q.dtype == cu_k.dtype == torch.int32
        for cu, most in ((cu_q, max_q), (cu_k, max_k)):
            assert most == int((cu[1:] - cu[:-1]).max())
        if torch.equal(cu_q, cu_k):
            return A.reference(q, k, v, cu_q, "causal" if causal else "bidirectional", None, scale)
        assert not causal  # queries at some rows: each sample's over all its keys
        scale = scale or q.shape[-1] ** -0.5
        return torch.cat([torch.einsum("hqk,khd->qhd", (torch.einsum(
            "qhd,khd->hqk", q[a:b], k[c:d]) * scale).softmax(-1), v[c:d])
            for a, b, c, d in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:])])

    if keyword_only:  # torch >= 2.12
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *,
                        return_aux=None, scale=None, window_size=(-1, -1)):
            return run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k,
                       tuple(window_size) == (-1, 0), scale)
    else:  # torch 2.10-2.11: no scale; causal as a flag
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False,
                        return_aux=None):
            return run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, None)
    return type("M", (), {"varlen_attn": staticmethod(varlen_attn)})


@pytest.mark.parametrize("keyword_only", [False, True])
@pytest.mark.parametrize("mask", ["bidirectional", "causal", "cm3"])
def test_varlen_is_called_in_the_signature_this_torch_has(monkeypatch, keyword_only, mask):
    monkeypatch.setitem(__import__("sys").modules, "torch.nn.attention.varlen",
                        _fake_varlen(keyword_only))
    q, k, v, cu = _problem([5, 1, 9], dtype=torch.float64)
    want = A.reference(q, k, v, cu, mask)
    assert torch.allclose(A._varlen(q, k, v, A.Layout(cu, mask), None), want, atol=1e-12)
    if keyword_only:  # a scale goes through where the signature takes one
        got = A._varlen(q, k, v, A.Layout(cu, mask), 0.3)
        assert torch.allclose(got, A.reference(q, k, v, cu, mask, scale=0.3), atol=1e-12)
    else:  # and is refused (the probe then skips the backend) where it does not
        with pytest.raises(NotImplementedError, match="scale"):
            A._varlen(q, k, v, A.Layout(cu, mask), 0.3)


@pytest.mark.parametrize("keyword_only", [False, True])
def test_varlen_query_rows_equal_the_reference_rows(monkeypatch, keyword_only):
    """The last layer's masked rows through ``varlen_attn`` (queries packed per sample, keys
    of every position); a sample without rows is not handed to the kernel: SDPA instead."""
    monkeypatch.setitem(__import__("sys").modules, "torch.nn.attention.varlen",
                        _fake_varlen(keyword_only))
    monkeypatch.setattr(A, "RAN", __import__("collections").Counter())
    q, k, v, cu = _problem([5, 1, 9], dtype=torch.float64)
    want = A.reference(q, k, v, cu)
    rows = torch.tensor([0, 3, 5, 7, 8, 14])
    got = A.attention(q[rows], k, v, cu, None, backend="varlen", rows=rows)
    torch.testing.assert_close(got, want[rows], atol=1e-12, rtol=0)
    assert A.RAN == {"varlen rows": 1}
    rows = torch.tensor([0, 3, 7, 8, 14])  # the second sample has none
    with pytest.raises(NotImplementedError, match="per sample"):
        A._varlen(q[rows], k, v, A.Layout(cu), None, rows)
    got = A.attention(q[rows], k, v, cu, None, backend="varlen", rows=rows)
    torch.testing.assert_close(got, want[rows], atol=1e-12, rtol=0)
    assert A.RAN["sdpa per sample"] == 1


@pytest.mark.parametrize("rows_work", [True, False])
def test_probe_takes_the_first_packed_kernel_that_works(monkeypatch, caplog, rows_work):
    """On CUDA the probe prefers varlen, then xformers (no padding, nothing to compile), and
    only tries flex and SDPA when neither passes, its rows check included; its own calls
    are not counted as the model's."""
    fake = _fake_varlen(True)
    if not rows_work:
        real = fake.varlen_attn

        def varlen_attn(q, k, v, cu_q, cu_k, *args, **kwargs):
            out = real(q, k, v, cu_q, cu_k, *args, **kwargs)
            return out if torch.equal(cu_q, cu_k) else out + 1
        fake = type("M", (), {"varlen_attn": staticmethod(varlen_attn)})
    monkeypatch.setitem(__import__("sys").modules, "torch.nn.attention.varlen", fake)
    monkeypatch.setattr(A, "_candidates", lambda device: ["varlen", "xformers", "flex", "sdpa"])
    tried = []
    for name in ("flex", "sdpa", "xformers"):
        def spy(*args, _name=name, _real=A._IMPL[name], **kwargs):
            tried.append(_name)
            return _real(*args, **kwargs)
        monkeypatch.setitem(A._IMPL, name, spy)
    monkeypatch.setattr(A, "RAN", __import__("collections").Counter({"sdpa view": 2}))
    with caplog.at_level(logging.INFO, logger="omnimask.attention"):
        picked = A._probe(torch.device("cpu"), torch.float32, "bidirectional")
    assert A.RAN == {"sdpa view": 2}
    if rows_work:
        assert picked == "varlen" and tried == []
    else:
        assert picked in ("flex", "sdpa") and {"xformers", "flex", "sdpa"} <= set(tried)
        assert "varlen unusable" in caplog.text and "query rows" in caplog.text


def test_auto_runs_a_view_at_equal_lengths(monkeypatch):
    """``auto`` with every length equal and a plain mask: SDPA on a view, without a probe."""
    monkeypatch.setattr(A, "RAN", __import__("collections").Counter())
    monkeypatch.setattr(A, "_CHOICE", {})
    q, k, v, cu = _problem([6, 6, 6], dtype=torch.float64)
    for mask in ("bidirectional", "causal"):
        got = A.attention(q, k, v, cu, 6, mask)
        torch.testing.assert_close(got, A.reference(q, k, v, cu, mask), atol=1e-12, rtol=0)
    assert A.RAN == {"sdpa view": 2} and A._CHOICE == {}


def _tiles(bm) -> tuple[list[set], list[set]]:
    """Per query tile: its partial and its full key tiles."""
    n = bm.kv_num_blocks.shape[-1]
    return ([set(bm.kv_indices[0, 0, i, :bm.kv_num_blocks[0, 0, i]].tolist()) for i in range(n)],
            [set(bm.full_kv_indices[0, 0, i, :bm.full_kv_num_blocks[0, 0, i]].tolist())
             for i in range(n)])


@pytest.mark.parametrize("mask", A.MASKS)
@pytest.mark.parametrize("lengths", [[5, 40, 3, 30, 17], [16, 16, 32], [1], [50], [7, 1, 64]])
def test_doc_block_mask_lists_every_tile_create_block_mask_finds(mask, lengths):
    """The block mask built from sample boundaries against torch's ``create_block_mask``
    (``mask_mod`` at every pair): no tile it attends is missing, none of ours is full that is
    not full there (both would be wrong answers on a GPU; CPU flex ignores the tiles), and
    for bidirectional/causal masks the tiles are exactly its (no wasted tiles)."""
    from torch.nn.attention.flex_attention import create_block_mask

    T = sum(lengths)
    pre = _pre(mask, lengths, [2, 10, 1, 30, 5][:len(lengths)])
    if mask == "blocks":  # contexts and blocks spanning tiles
        pre = torch.randint(0, 3, (T,), generator=torch.Generator().manual_seed(3))
    mod = A.doc_mask_mod(lengths, mask, pre, "cpu")
    ours = _tiles(A.doc_block_mask(lengths, mask, mod, "cpu", block=16))
    want = _tiles(create_block_mask(mod, None, None, T, T, device="cpu", BLOCK_SIZE=16))
    for p, f, wp, wf in zip(*ours, *want):
        assert not p & f and p | f >= wp | wf and f <= wf
    if mask in ("bidirectional", "causal", "cm3"):
        assert ours == want
