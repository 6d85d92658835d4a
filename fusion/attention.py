"""Attention over packed sequences, behind one function, with a runtime-probed backend.

``attention(q, k, v, cu_seqlens, max_seqlen, mask)`` with q/k/v of shape ``[T, heads, dim]``
(all samples concatenated, see ``fusion/packing.py``). Masks never cross sample
boundaries. Kinds: ``bidirectional``; ``causal``; ``prefix`` (bidirectional over each
sample's first ``prefix_len[i]`` positions, causal after: captioning with an image
prefix); ``cm3`` (a CM3 document is already rearranged by the data transform, so its
attention is causal); ``blocks`` (several queries of one context packed in one sample,
e.g. the questions of one image: ``prefix_len`` is then a LongTensor [T] of block ids per
packed position, 0 = the shared context, k >= 1 = block k; a position attends to the
keys of its sample in block 0 or in its own block, so the context sees only itself and
the blocks never see each other).

Backends: ``sdpa`` (PyTorch scaled_dot_product_attention on per-sample padded blocks with
a boolean mask; CPU and everywhere), ``varlen`` (``torch.nn.attention.varlen.varlen_attn``,
CUDA, no padding), ``xformers`` (``memory_efficient_attention`` with block-diagonal
masks, CUDA; its kernels only load with the torch it was built for), ``flex``
(FlexAttention over the packed sequence with a document ``mask_mod``: no padding and
every mask kind, prefix-LM and blocks included; compiled on CUDA; on CPU unfused and
forward only). ``auto`` probes the candidates once per (device, dtype, mask) on a tiny
problem against a float64 reference: the first packed kernel that agrees (varlen, then
xformers) is taken, else the faster of flex and SDPA; the choice is logged. With every
length equal ``auto`` runs SDPA on a view. ``RAN`` counts the paths run. A missing or
broken xformers never breaks an import.
"""

from __future__ import annotations

import collections
import functools
import inspect
import logging
import math
import time

import torch
import torch.nn.functional as F

from .packing import group_slots

log = logging.getLogger("omnimask.attention")
MASKS = ("bidirectional", "causal", "prefix", "cm3", "blocks")
BACKENDS = ("auto", "sdpa", "varlen", "xformers", "flex")
_CHOICE: dict[tuple, str] = {}
RAN: collections.Counter = collections.Counter()  # calls per path run (the bench reports it)


def _lengths(cu: torch.Tensor) -> list[int]:
    return (cu[1:] - cu[:-1]).tolist()


def block_ids(prefix_len, total: int, device=None) -> torch.Tensor:
    """mask='blocks': the [T] block ids carried by ``prefix_len``, checked."""
    if prefix_len is None:
        raise ValueError("mask='blocks' needs prefix_len: a LongTensor [T] of block ids per "
                         "packed position (0 = the shared context)")
    ids = torch.as_tensor(prefix_len, device=device)
    if ids.ndim != 1 or ids.numel() != total or ids.is_floating_point():
        raise ValueError(f"mask='blocks' needs prefix_len as integer block ids, one per packed "
                         f"position ({total}), got shape {tuple(ids.shape)} {ids.dtype}")
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(f"mask='blocks' block ids must be >= 0, got {int(ids.min())}")
    return ids.long()


def block_mask(lengths: list[int], mask: str, prefix_len=None, device=None) -> torch.Tensor:
    """[B, 1, L, L] boolean (True = may attend) for per-sample padded blocks."""
    if mask not in MASKS:
        raise ValueError(f"unknown mask {mask!r}; known: {', '.join(MASKS)}")
    L = max(lengths)
    lens = torch.tensor(lengths, device=device)
    i = torch.arange(L, device=device)
    valid = i[None] < lens[:, None]  # [B, L]
    m = valid[:, :, None] & valid[:, None, :]
    if mask == "blocks":  # block ids [T] -> [B, L]; a key in block 0 or the query's block
        ids = block_ids(prefix_len, sum(lengths), device)
        blk = ids.new_zeros(len(lengths), L)
        blk[valid] = ids
        m = m & ((blk[:, None, :] == 0) | (blk[:, None, :] == blk[:, :, None]))
    if mask in ("causal", "cm3", "prefix"):
        causal = i[:, None] >= i[None, :]
        if mask == "prefix":
            if prefix_len is None:
                raise ValueError("mask='prefix' needs prefix_len (one length per sample)")
            p = torch.as_tensor(prefix_len, device=device)
            causal = causal[None] | (i[None, None, :] < p[:, None, None])
        m = m & causal
    # padded query rows attend to themselves only (keeps softmax finite; they are dropped)
    m = m | (~valid[:, :, None] & torch.eye(L, dtype=torch.bool, device=device)[None])
    return m[:, None]


def _blocks(lengths: list[int], device) -> tuple[torch.Tensor, int, int]:
    """Row of each packed position in a [B * L] per-sample padded layout."""
    L = max(lengths)
    idx = torch.cat([torch.arange(n, device=device) + b * L for b, n in enumerate(lengths)])
    return idx, len(lengths), L


def to_blocks(x: torch.Tensor, idx: torch.Tensor, B: int, L: int) -> torch.Tensor:
    """Packed [T, H, D] -> padded [B, H, L, D]."""
    out = x.new_zeros(B * L, *x.shape[1:])
    out[idx] = x
    return out.view(B, L, *x.shape[1:]).transpose(1, 2)


def from_blocks(o: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Padded [B, H, L, D] -> packed [T, H, D]."""
    B, H, L, D = o.shape
    return o.transpose(1, 2).reshape(B * L, H, D)[idx]


class Layout:
    """What every layer's attention needs of one packed batch, built once per forward:
    sample lengths, the packed -> per-sample padded row index and the boolean mask (both
    lazily). ``equal``: every sample has one length, so padding is a view."""

    def __init__(self, cu: torch.Tensor, mask: str = "bidirectional", prefix_len=None) -> None:
        if mask not in MASKS:
            raise ValueError(f"unknown mask {mask!r}; known: {', '.join(MASKS)}")
        self.cu, self.mask, self.prefix_len = cu, mask, prefix_len
        self.lengths = _lengths(cu)
        self.B, self.L = len(self.lengths), max(self.lengths)
        self.equal = min(self.lengths) == self.L
        self._idx: torch.Tensor | None = None
        self._bool: torch.Tensor | None = None

    def idx(self, device) -> torch.Tensor:
        if self._idx is None:
            self._idx = _blocks(self.lengths, device)[0]
        return self._idx

    def bool_mask(self, device) -> torch.Tensor:
        """[B, 1, L, L], True = may attend (see ``block_mask``)."""
        if self._bool is None:
            self._bool = block_mask(self.lengths, self.mask, self.prefix_len, device)
        return self._bool

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Packed [T, H, D] -> [B, H, L, D] (a view when ``equal``)."""
        if self.equal:
            return x.view(self.B, self.L, *x.shape[1:]).transpose(1, 2)
        return to_blocks(x, self.idx(x.device), self.B, self.L)

    def unpad(self, o: torch.Tensor) -> torch.Tensor:
        if self.equal:
            return o.transpose(1, 2).reshape(-1, *o.shape[1:2], o.shape[-1])
        return from_blocks(o, self.idx(o.device))

    def row_samples(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sample of each packed position in ``rows``, and how many rows each sample has."""
        sample = torch.searchsorted(self.cu.to(rows.device).long(), rows, right=True) - 1
        return sample, torch.bincount(sample, minlength=self.B)

    def query_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """For query positions ``rows`` (sorted packed indices): the row of each in a
        [B * Lq] per-sample padded query layout, each one's position in its sample, and Lq."""
        cu = self.cu.to(rows.device).long()
        sample, _ = self.row_samples(rows)
        rank, counts = group_slots(sample, self.B)
        Lq = max(int(counts.max()), 1) if rows.numel() else 1
        return sample * Lq + rank, rows - cu[sample], Lq


def _padded_rows(q, k, v, lay: Layout, rows):
    """Padded [B, H, Lq|L, D] q/k/v and the [B, 1, Lq|L, L] mask; ``unpad(o)`` packs back.
    With ``rows``, q holds only those positions' queries."""
    m = lay.bool_mask(q.device)
    kp, vp = lay.pad(k), lay.pad(v)
    if rows is None:
        return lay.pad(q), kp, vp, m, lay.unpad
    qi, local, Lq = lay.query_rows(rows)
    sample = qi // Lq
    mq = m.new_zeros(lay.B * Lq, lay.L)
    mq[:, 0] = True  # padded query rows see one key (finite softmax; they are dropped)
    mq[qi] = m[sample, 0, local]
    qp = q.new_zeros(lay.B * Lq, *q.shape[1:])
    qp[qi] = q
    qp = qp.view(lay.B, Lq, *q.shape[1:]).transpose(1, 2)

    def unpad(o):
        return o.transpose(1, 2).reshape(lay.B * Lq, *o.shape[1:2], o.shape[-1])[qi]
    return qp, kp, vp, mq.view(lay.B, 1, Lq, lay.L), unpad


_EAGER: dict = {}  # function -> its torch.compiler.disable'd self, once something compiles


def eager(fn):
    """``fn`` run eagerly inside compiled code (``torch.compiler.disable``), the disabled
    version built the first time a trace reaches it: a process that never compiles does not
    import torch._dynamo (~4 s)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        if torch.compiler.is_compiling():
            if fn not in _EAGER:
                _EAGER[fn] = torch.compiler.disable(fn)
            return _EAGER[fn](*args, **kwargs)
        return fn(*args, **kwargs)
    return run


@eager
def math_attention(q, k, v, cu, mask="bidirectional", prefix_len=None, scale=None, probs=None,
                   layout: Layout | None = None, rows: torch.Tensor | None = None):
    """Explicit attention on padded blocks; ``probs(scores, allowed)`` replaces the softmax
    (the trunk's clipped softmax uses this: fused kernels only do softmax). ``rows``: only
    those packed positions' queries (``q`` then holds just them)."""
    lay = layout or Layout(cu, mask, prefix_len)
    qp, kp, vp, m, unpad = _padded_rows(q, k, v, lay, rows)
    s = qp @ kp.transpose(-1, -2) * (scale or 1 / math.sqrt(q.shape[-1]))
    p = probs(s, m) if probs is not None else s.masked_fill(~m, float("-inf")).softmax(-1)
    return unpad(p @ vp)


def _per_sample(q, k, v, lay: Layout, scale, rows):
    """CPU, no padding: one unmasked (or causal) SDPA call per sample, on views."""
    causal = lay.mask in ("causal", "cm3")
    if rows is None:
        qs = torch.split(q, lay.lengths)
    else:
        qs = torch.split(q, lay.row_samples(rows)[1].tolist())
    ks, vs = torch.split(k, lay.lengths), torch.split(v, lay.lengths)
    return torch.cat([F.scaled_dot_product_attention(
        a.transpose(0, 1), b.transpose(0, 1), c.transpose(0, 1), is_causal=causal, scale=scale
    ).transpose(0, 1) for a, b, c in zip(qs, ks, vs)])


def _sdpa(q, k, v, lay: Layout, scale, rows=None):
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        # the CPU kernels run bf16 attention slower than fp32 (per-sample calls: 1.6x), and
        # fp32 scores are the more exact: compute in fp32, hand back the input dtype
        with torch.autocast("cpu", enabled=False):  # autocast would cast them back to bf16
            return _sdpa(q.float(), k.float(), v.float(), lay, scale, rows).to(q.dtype)
    plain = lay.mask in ("bidirectional", "causal", "cm3")
    if plain and rows is None and lay.equal:  # a view, no mask: the fused kernel's best case
        RAN["sdpa view"] += 1
        o = F.scaled_dot_product_attention(lay.pad(q), lay.pad(k), lay.pad(v), scale=scale,
                                           is_causal=lay.mask != "bidirectional")
        return lay.unpad(o)
    if q.device.type == "cpu" and (lay.mask == "bidirectional" or plain and rows is None):
        RAN["sdpa per sample"] += 1
        return _per_sample(q, k, v, lay, scale, rows)
    RAN["sdpa padded"] += 1
    qp, kp, vp, m, unpad = _padded_rows(q, k, v, lay, rows)
    return unpad(F.scaled_dot_product_attention(qp, kp, vp, attn_mask=m, scale=scale))


def _varlen(q, k, v, lay: Layout, scale, rows=None):
    """``varlen_attn`` in either signature torch has shipped: (..., is_causal) before
    ``scale``/``window_size`` existed (torch 2.10-2.11), and keyword-only ``scale`` and
    ``window_size`` after; an argument its signature lacks is only passed when needed.
    ``rows`` (bidirectional, every sample with at least one): queries at those sorted
    packed positions only, each over its sample's keys (``cu_seq_q`` != ``cu_seq_k``)."""
    from torch.nn.attention.varlen import varlen_attn

    cu, mask = lay.cu, lay.mask
    cu_k = cu.to(device=q.device, dtype=torch.int32)
    cu_q, max_q = cu_k, lay.L
    if rows is not None:
        counts = lay.row_samples(rows)[1]
        fewest, max_q = torch.stack([counts.min(), counts.max()]).tolist()
        if mask != "bidirectional" or fewest < 1:  # a query-less sample: not to the kernel
            raise NotImplementedError("varlen_attn query rows: bidirectional, >= 1 per sample")
        cu_q = F.pad(counts.cumsum(0), (1, 0)).to(device=q.device, dtype=torch.int32)
    params = inspect.signature(varlen_attn).parameters
    kw = {}
    if scale is not None:
        if "scale" not in params:
            raise NotImplementedError("this torch's varlen_attn takes no scale")
        kw["scale"] = scale
    if mask in ("causal", "cm3"):
        if "window_size" in params:
            kw["window_size"] = (-1, 0)
        elif "is_causal" in params:
            kw["is_causal"] = True
        else:
            raise NotImplementedError("this torch's varlen_attn has no causal mode")
    elif mask in ("prefix", "blocks"):
        raise NotImplementedError(f"varlen_attn has no {mask} mask")
    RAN["varlen" if rows is None else "varlen rows"] += 1
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, lay.L, **kw)


def _xformers(q, k, v, lay: Layout, scale):
    from xformers.ops import fmha

    lens, mask = lay.lengths, lay.mask
    if mask == "bidirectional":
        bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(lens)
    elif mask in ("causal", "cm3"):
        bias = fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens(lens)
    else:
        raise NotImplementedError(f"xformers has no block-diagonal {mask} mask")
    RAN["xformers"] += 1
    return fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias,
                                           scale=scale)[0]


_FLEX: dict = {"compiled": None, "key": None, "mask": None}


def _flex_mask(cu: torch.Tensor, mask: str, prefix_len, device):
    """A FlexAttention BlockMask for the packed layout; reused while the batch is the same
    (every layer of one forward asks for the same mask)."""
    lengths = _lengths(cu)
    key = (tuple(lengths), mask, None if prefix_len is None else tuple(
        torch.as_tensor(prefix_len).tolist()), str(device))
    if _FLEX["key"] == key:
        return _FLEX["mask"]
    mod = doc_mask_mod(lengths, mask, prefix_len, device)
    _FLEX["key"], _FLEX["mask"] = key, doc_block_mask(lengths, mask, mod, device)
    return _FLEX["mask"]


def doc_mask_mod(lengths: list[int], mask: str, prefix_len, device):
    """FlexAttention's ``mask_mod`` for samples of ``lengths`` packed in one sequence."""
    lens = torch.tensor(lengths, device=device)
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), lens)
    local = torch.arange(doc.numel(), device=device) - (torch.cumsum(lens, 0) - lens)[doc]
    if mask == "bidirectional":
        def mod(b, h, qi, ki):
            return doc[qi] == doc[ki]
    elif mask in ("causal", "cm3"):
        def mod(b, h, qi, ki):
            return (doc[qi] == doc[ki]) & (qi >= ki)
    elif mask == "blocks":
        blk = block_ids(prefix_len, doc.numel(), device)

        def mod(b, h, qi, ki):
            return (doc[qi] == doc[ki]) & ((blk[ki] == 0) | (blk[ki] == blk[qi]))
    else:
        if prefix_len is None:
            raise ValueError("mask='prefix' needs prefix_len (one length per sample)")
        pre = torch.as_tensor(prefix_len, device=device)

        def mod(b, h, qi, ki):
            return (doc[qi] == doc[ki]) & ((qi >= ki) | (local[ki] < pre[doc[ki]]))
    return mod


def doc_block_mask(lengths: list[int], mask: str, mask_mod, device, block: int = 128):
    """The FlexAttention ``BlockMask`` of packed samples of ``lengths``, built from their
    boundaries: a query tile's key tiles are those of the samples it overlaps (causal: up
    to its own), O(tiles^2) index work where ``create_block_mask`` evaluates ``mask_mod`` at
    all T^2 pairs. Tiles wholly inside one sample are full (``mask_mod`` skipped) where the
    kind lets every pair attend: bidirectional, and causal below the diagonal; ``prefix`` and
    ``blocks`` keep ``mask_mod`` on every tile."""
    from torch.nn.attention.flex_attention import BlockMask

    T = sum(lengths)
    n = max(1, -(-T // block))
    cu = torch.tensor([0, *lengths], device=device).cumsum(0)
    tile = torch.arange(n, device=device)
    first, last = tile * block, ((tile + 1) * block).clamp(max=max(T, 1)) - 1
    d0 = torch.searchsorted(cu, first, right=True) - 1  # the samples each tile spans
    d1 = torch.searchsorted(cu, last, right=True) - 1
    lo, hi = cu[d0] // block, (cu[d1 + 1] - 1).clamp(min=0) // block
    causal = mask in ("causal", "cm3")
    if causal:
        hi = torch.minimum(hi, tile)
    q, k = tile[:, None], tile[None, :]
    near = (k >= lo[:, None]) & (k <= hi[:, None])  # [query tile, key tile]
    whole = (d0 == d1) & ((tile + 1) * block <= T)  # one sample, not the ragged last tile
    full = near & whole[:, None] & whole[None, :] & (d0[:, None] == d0[None, :])
    if causal:
        full &= k < q
    elif mask != "bidirectional":
        full &= False

    def listed(m):  # per query tile: how many key tiles, and their indices first
        order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True)
        return m.sum(-1).int()[None, None], order.int()[None, None]

    return BlockMask.from_kv_blocks(*listed(near & ~full), *listed(full), BLOCK_SIZE=block,
                                    mask_mod=mask_mod, seq_lengths=(T, T))


def _flex(q, k, v, lay: Layout, scale):
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type == "cpu" and torch.is_grad_enabled() and any(
            x.requires_grad for x in (q, k, v)):
        raise NotImplementedError("FlexAttention has no backward on CPU (inference only); "
                                  "use attention_backend=sdpa or auto to train on CPU")
    fn = flex_attention
    if q.device.type == "cuda":
        if _FLEX["compiled"] is None:
            _FLEX["compiled"] = torch.compile(flex_attention, dynamic=True)
        fn = _FLEX["compiled"]
    bm = _flex_mask(lay.cu, lay.mask, lay.prefix_len, q.device)
    RAN["flex"] += 1
    with warnings.catch_warnings():  # the unfused path warns once; it is still exact
        warnings.simplefilter("ignore", UserWarning)
        o = fn(*(x.transpose(0, 1)[None] for x in (q, k, v)), block_mask=bm, scale=scale)
    return o[0].transpose(0, 1)


_IMPL = {"sdpa": _sdpa, "varlen": _varlen, "xformers": _xformers, "flex": _flex}


def reference(q, k, v, cu, mask="bidirectional", prefix_len=None, scale=None) -> torch.Tensor:
    """Each sample alone, explicit mask, float64 softmax: the ground truth for tests/probe."""
    outs = []
    lengths = _lengths(cu)
    for b, n in enumerate(lengths):
        s, e = int(cu[b]), int(cu[b + 1])
        qs, ks, vs = (x[s:e].double().transpose(0, 1) for x in (q, k, v))  # [H, n, D]
        att = qs @ ks.transpose(1, 2) * (scale or 1 / math.sqrt(q.shape[-1]))
        if mask == "blocks":
            pre = block_ids(prefix_len, q.shape[0])[s:e]
        else:
            pre = None if prefix_len is None else [prefix_len[b]]
        m = block_mask([n], mask, pre, q.device)[0, 0]
        att = att.masked_fill(~m, float("-inf")).softmax(-1)
        outs.append((att @ vs).transpose(0, 1))
    return torch.cat(outs).to(q.dtype)


FUSED = ("varlen", "xformers")  # packed kernels, no padding: preferred as they come


def _candidates(device: torch.device) -> list[str]:
    """Backends the probe tries on ``device``, in order of preference: the packed flash
    kernels (the first that passes is taken), then flex (compiled on first use, seconds)
    and padded SDPA, timed against each other."""
    return ["varlen", "xformers", "flex", "sdpa"] if device.type == "cuda" else ["sdpa"]


def _probe(device: torch.device, dtype: torch.dtype, mask: str) -> str:
    ran = RAN.copy()
    try:
        return _probe_candidates(device, dtype, mask)
    finally:  # the probe's own calls are not the model's
        RAN.clear()
        RAN.update(ran)


def _probe_candidates(device: torch.device, dtype: torch.dtype, mask: str) -> str:
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 5, 17, 24], dtype=torch.int32)
    q, k, v = (torch.randn(24, 2, 16, generator=g).to(device, dtype) for _ in range(3))
    pre = {"prefix": [2, 4, 3],  # blocks: a context, interleaved and empty-context samples
           "blocks": torch.tensor([0, 0, 1, 1, 2] + [0, 0, 0, 1, 2, 1, 2, 2, 3, 0, 3, 1]
                                  + [1, 1, 2, 2, 2, 1, 1])}.get(mask)
    want = reference(q, k, v, cu, mask, pre).float()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    rows = torch.tensor([1, 4, 5, 9, 16, 20], device=device)  # query rows: >= 1 per sample
    timed = {}
    for name in _candidates(device):
        try:
            lay = Layout(cu, mask, pre)
            got = _IMPL[name](q, k, v, lay, None).float()
            if not torch.allclose(got, want, atol=tol, rtol=tol):
                raise RuntimeError(f"max error {(got - want).abs().max():.2e}")
            if name == "varlen" and mask == "bidirectional":  # the last layer's query rows
                got, sub = _IMPL[name](q[rows], k, v, lay, None, rows).float(), want[rows]
                if not torch.allclose(got, sub, atol=tol, rtol=tol):
                    raise RuntimeError(f"query rows: max error {(got - sub).abs().max():.2e}")
            if name in FUSED:  # no padding and nothing to compile: the first that works
                return name
            t0 = time.perf_counter()
            for _ in range(3):  # flex pays for its block mask, as with each new batch
                _FLEX["key"] = None
                _IMPL[name](q, k, v, Layout(cu, mask, pre), None)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            timed[name] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - any failure means: not this backend here
            log.info("attention backend %s unusable on %s/%s/%s: %s", name, device.type, dtype,
                     mask, str(e).splitlines()[0] if str(e) else type(e).__name__)
    if not timed:  # sdpa always works; this would be a torch bug
        raise RuntimeError("no attention backend passed the probe")
    return min(timed, key=timed.get)


def choose_backend(device: torch.device, dtype: torch.dtype, mask: str) -> str:
    key = (device.type, dtype, mask)
    if key not in _CHOICE:
        _CHOICE[key] = _probe(device, dtype, mask)
        log.info("attention backend for %s/%s/%s: %s", device.type, str(dtype).split(".")[-1],
                 mask, _CHOICE[key])
    return _CHOICE[key]


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    allowed: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Queries [Tq, H, D] over keys/values [Tk, H, D] with a per-query mask ``allowed``
    ([Tq, Tk] or [H, Tq, Tk], True = may attend), as in Mask2Former/SEEM masked attention:
    a query whose row is fully blocked attends everywhere instead (never NaN)."""
    if allowed is not None:
        allowed = allowed.bool()
        allowed = allowed | ~allowed.any(-1, keepdim=True)  # unblock fully blocked rows
        if allowed.ndim == 2:
            allowed = allowed[None]
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                       v.transpose(0, 1)[None],
                                       attn_mask=None if allowed is None else allowed[None],
                                       scale=scale)
    return o[0].transpose(0, 1)


@eager  # data-dependent (lengths, masks): compiled blocks run it eagerly
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
              max_seqlen: int | None = None, mask: str = "bidirectional", prefix_len=None,
              backend: str = "auto", scale: float | None = None, layout: Layout | None = None,
              rows: torch.Tensor | None = None) -> torch.Tensor:
    """[T, H, D] x3 -> [T, H, D]; see the module docstring. ``layout``: the batch's
    ``Layout`` when the caller has one (every layer of a forward shares it). ``rows``:
    sorted packed positions whose queries ``q`` holds ([P, H, D], keys and values still of
    every position) -> [P, H, D]; computed by ``varlen_attn`` where that is the backend (a
    bidirectional mask, every sample with a row), else by the SDPA path. ``auto`` with
    every length equal and a plain mask runs SDPA on a view (no padding, no mask)."""
    if mask not in MASKS:
        raise ValueError(f"unknown mask {mask!r}; known: {', '.join(MASKS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; known: {', '.join(BACKENDS)}")
    lay = layout or Layout(cu_seqlens, mask, prefix_len)
    auto = backend == "auto"
    if auto:
        if lay.equal and rows is None and mask in ("bidirectional", "causal", "cm3"):
            return _sdpa(q, k, v, lay, scale)  # equal lengths: a view, SDPA's best case
        backend = choose_backend(q.device, q.dtype, mask)
    if rows is not None:
        if backend == "varlen" and mask == "bidirectional":
            try:
                return _varlen(q, k, v, lay, scale, rows)
            except NotImplementedError:  # a sample without query rows
                pass
        return _sdpa(q, k, v, lay, scale, rows)
    try:
        return _IMPL[backend](q, k, v, lay, scale)
    except NotImplementedError:  # e.g. a scale this torch's varlen_attn does not take
        if not auto:
            raise
        return _sdpa(q, k, v, lay, scale)
