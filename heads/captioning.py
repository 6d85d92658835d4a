"""Captioning head: prefix-LM training on the shared trunk and beam search over a KV cache.

A sample is ``[image][<cls> caption <eos>]``: the image and ``<cls>`` are the prefix
(bidirectional among themselves), the caption is causal (mask ``prefix``, prefix length =
image tokens + 1). Each caption position predicts the next token, ``<eos>`` included,
through the encoder's tied vocabulary head, over the allowed ids only: text tokens (no
specials) and ``<eos>``, so image codes and speech units are never predicted.

Decoding (:func:`generate`) encodes each image and ``<cls>`` once, keeps every layer's keys
and values (``fusion.trunk.KVCache``) and feeds one token per beam per step: greedy for one
beam, else beam search as in Hugging Face transformers (``2 * beams`` candidates per
image, a finished caption scored ``sum(log p) / len ** length_penalty``, ``len`` counting
``<eos>``; an image is done when ``beams`` captions are finished and no live beam can
still beat the worst of them), with fairseq's no-repeat-n-gram ban.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from omnimask.config import check_fields
from omnimask.errors import OmnimaskError
from omnimask.fusion.packing import IGNORE, Segment, pack
from omnimask.fusion.trunk import KVCache
from omnimask.registry import HEADS

START, END = "cls", "eos"  # the caption's first token (in the prefix) and its end token


@dataclass
class CaptionHeadConfig:
    max_len: int = 30  # caption tokens generated at most, <eos> included (longer truncated)
    beams: int = 3
    length_penalty: float = 1.0  # alpha: a finished caption scores sum(log p) / len ** alpha
    no_repeat_ngram: int = 0  # > 0: no n-gram of this size twice in a caption
    label_smoothing: float = 0.0
    # decoding against the language prior (contrastive decoding, as VCD): each step's
    # log-probabilities become (1 + w) log p(. | image, prefix) - w log p(. | prefix), the
    # second from the same trunk without the image, over the tokens whose p(. | image) is
    # at least `prior_cutoff` of the best one's; 0: off
    prior_weight: float = 0.0
    prior_cutoff: float = 0.1

    def __post_init__(self) -> None:
        p = "heads.caption."
        check_fields(self, ">=1", "max_len", "beams", prefix=p)
        check_fields(self, ">=0", "no_repeat_ngram", "prior_weight", prefix=p)
        check_fields(self, "[0,1)", "label_smoothing", prefix=p)
        check_fields(self, "(0,1]", "prior_cutoff", prefix=p)


def allowed_ids(vocab, size: int | None = None) -> torch.Tensor:
    """[size] bool: the ids a caption may hold: text tokens but the specials, and <eos>."""
    a = torch.zeros(size or vocab.size, dtype=torch.bool)
    a[:vocab.text_size] = True
    a[sorted(vocab.specials.values())] = False
    a[vocab.special(END)] = True
    return a


def caption_sample(vocab, image: Segment, caption: Sequence[int], max_len: int,
                   hidden: torch.Tensor | None = None) -> list[Segment]:
    """``[image][<cls> caption <eos>]`` with next-token targets on the text (the caption cut
    to ``max_len - 1`` tokens so that <eos> fits); the tokens in ``hidden`` are read as
    ``<mask>`` and not predicted."""
    cap = [int(t) for t in caption][:max_len - 1]
    ids = torch.tensor([vocab.special(START), *cap, vocab.special(END)])
    targets = torch.cat([ids[1:], torch.tensor([IGNORE])])
    if hidden is not None and len(hidden):
        gone = torch.isin(ids, hidden)
        ids = ids.masked_fill(gone, vocab.special("mask"))
        targets = targets.masked_fill(torch.isin(targets, hidden), IGNORE)
    return [image, Segment("text", ids=ids, targets=targets)]


def caption_batch(vocab, images: list[Segment], captions: list[Sequence[int]], max_len: int,
                  hidden: list[torch.Tensor | None] | None = None) -> dict:
    """A training batch: image k with caption k (see :func:`caption_sample`; ``hidden[k]``
    its hidden tokens)."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    hidden = hidden or [None] * len(images)
    p = pack([caption_sample(vocab, i, c, max_len, h)
              for i, c, h in zip(images, captions, hidden)])
    return {"packed": p, "prefix_len": [len(i) + 1 for i in images],
            "allowed": allowed_ids(vocab)}


def smoothed_loss(logits: torch.Tensor, target: torch.Tensor, allowed: torch.Tensor | None,
                  smoothing: float) -> torch.Tensor:
    """Cross-entropy over the allowed ids; label smoothing spreads over those ids only (the
    banned ones have probability 0, so PyTorch's smoothing over all would be infinite)."""
    if allowed is not None:
        allowed = allowed.to(logits.device)[:logits.shape[-1]]
        logits = logits.masked_fill(~allowed, float("-inf"))
    logp = logits.log_softmax(-1)
    nll = -logp.gather(1, target[:, None])[:, 0]
    if not smoothing:
        return nll.mean()
    n = allowed.sum() if allowed is not None else logits.shape[-1]
    keep = allowed if allowed is not None else torch.ones_like(logp[0], dtype=torch.bool)
    uniform = -logp.masked_fill(~keep, 0.0).sum(-1) / n
    return ((1 - smoothing) * nll + smoothing * uniform).mean()


@HEADS.register("caption")
class CaptionHead(nn.Module):
    """No parameters of its own: the trunk's tied vocabulary head predicts the caption."""

    Config = CaptionHeadConfig

    def __init__(self, model_cfg=None, cfg: CaptionHeadConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or CaptionHeadConfig()

    def forward(self, encoder, batch: dict) -> dict:
        p = batch["packed"]
        h = encoder(p, mask="prefix", prefix_len=batch["prefix_len"])
        pos = p.target_positions.to(h.device)
        target = p.targets.to(h.device)[pos]
        logits = encoder.vocab_logits(h, pos).float()
        if "prior" in batch:  # a product of experts in training (tasks.caption.debias_prior)
            prior = batch["prior"].to(logits.device)
            logits = logits + F.pad(prior, (0, logits.shape[-1] - prior.shape[-1]))
        loss = smoothed_loss(logits, target, batch.get("allowed"), self.cfg.label_smoothing)
        acc = (logits.masked_fill(~batch["allowed"].to(h.device), float("-inf"))
               if "allowed" in batch else logits).argmax(-1).eq(target).float().mean()
        return {"loss": loss, "caption": loss.detach(), "caption_acc": acc.detach(),
                "tokens": p.num_tokens}


# -- decoding --------------------------------------------------------------------------------
# step(rows, tokens) -> [len(rows), V] log-probabilities of the token after each new row,
# row i being row rows[i] of the previous call extended by tokens[i]
Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def banned_tokens(out: list[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already present in ``out`` (fairseq's
    no-repeat-n-gram ban)."""
    if len(out) < n:
        return set()
    head = tuple(out[len(out) - n + 1:]) if n > 1 else ()
    return {out[i + n - 1] for i in range(len(out) - n + 1) if tuple(out[i:i + n - 1]) == head}


def _banned(seq: list[int], n: int) -> list[int]:
    return sorted(banned_tokens(seq, n)) if n else []


def image_input(model, x: torch.Tensor) -> Segment:
    """One image as the model reads it: uint8 pixels [3, S, S] through its image encoder
    (``model.image_input=pixels``), else feature rows [P, d] on a square grid."""
    if model.encoder.pixels:
        g = model.cfg.image_encoder.grid
        return Segment("image", pixels=x, grid=(g, g))
    s = math.isqrt(len(x))
    if s * s != len(x):
        raise OmnimaskError(f"{len(x)} image feature rows are not a square grid")
    return Segment("image", features=x.float(), grid=(s, s))


def _ban(logp: torch.Tensor, seqs: list[list[int]], n: int) -> torch.Tensor:
    if n:
        for r, s in enumerate(seqs):
            ban = _banned(s, n)
            if ban:
                logp[r, ban] = float("-inf")
    return logp


def greedy_search(first: torch.Tensor, step: Step, max_len: int, end: int,
                  no_repeat_ngram: int = 0) -> list[list[int]]:
    """The most likely token each step until ``end`` or ``max_len`` tokens; ``first``: [B, V]
    log-probabilities of the first token. Returns the tokens, ``end`` left out."""
    B = first.shape[0]
    outs: list[list[int]] = [[] for _ in range(B)]
    live = list(range(B))  # image of each row
    logp = first
    for t in range(max_len):
        best = _ban(logp.clone(), [outs[b] for b in live], no_repeat_ngram).max(-1)
        # every token banned: the caption ends there
        nxt = best.indices.masked_fill(~torch.isfinite(best.values), end).tolist()
        keep = []
        for r, (b, tok) in enumerate(zip(live, nxt)):
            if tok != end:
                outs[b].append(tok)
                keep.append(r)
        live = [live[r] for r in keep]
        if not live or t == max_len - 1:
            break
        logp = step(torch.tensor(keep), torch.tensor([nxt[r] for r in keep]))
    return outs


def beam_search(first: torch.Tensor, step: Step, beams: int, max_len: int, end: int,
                length_penalty: float = 1.0, no_repeat_ngram: int = 0) -> list[list[int]]:
    """Beam search (see the module docstring) from ``first`` [B, V], the log-probabilities
    of each image's first token. Returns each image's best caption, ``end`` left out."""
    B = first.shape[0]

    def score(total: float, n: int) -> float:
        return total / n ** length_penalty

    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = [False] * B
    # live beams, one per row of ``logp``: (image, sum of log-probabilities, tokens)
    live = [(b, 0.0, []) for b in range(B)]
    logp = first
    for t in range(1, max_len + 1):
        logp = _ban(logp.float().clone(), [s for _, _, s in live], no_repeat_ngram)
        total = torch.tensor([s for _, s, _ in live], dtype=logp.dtype)[:, None] + logp.cpu()
        V = total.shape[1]
        image = torch.tensor([b for b, _, _ in live])
        new = []  # the next live beams: (image, sum of log-probabilities, tokens, parent row)
        for b in range(B):
            mine = (image == b).nonzero(as_tuple=True)[0]
            if done[b] or not mine.numel():
                continue
            for r in mine[~torch.isfinite(total[mine]).any(-1)].tolist():
                if live[r][2]:  # every token banned after it: it ends there (as greedy)
                    finished[b].append((score(live[r][1], len(live[r][2])), live[r][2]))
            cand = total[mine].flatten()
            top = cand.topk(min(2 * beams, int(torch.isfinite(cand).sum())))
            mine_new = []
            for rank, (s, j) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
                row, tok = int(mine[j // V]), j % V
                if tok == end:
                    if rank < beams:  # as HF: an <eos> ranked past the beams is not kept
                        finished[b].append((score(s, t), live[row][2]))
                    continue
                mine_new.append((b, s, live[row][2] + [tok], row))
                if len(mine_new) == beams:
                    break
            finished[b] = sorted(finished[b], key=lambda x: -x[0])[:beams]
            if not mine_new:
                done[b] = True
            elif len(finished[b]) == beams:
                # the best a live beam can still reach: sum(log p) only falls, so at the
                # longest length when the penalty favours length, else at the current one
                reach = score(mine_new[0][1], max_len if length_penalty > 0 else t)
                done[b] = finished[b][-1][0] >= reach
            if not done[b]:
                new += mine_new
        live = [(b, s, seq) for b, s, seq, _ in new]
        if t == max_len or not live:
            break
        logp = step(torch.tensor([x[3] for x in new]), torch.tensor([x[2][-1] for x in new]))
    for b, s, seq in live:  # max_len reached: the live beams compete too (HF's finalize)
        if not done[b]:
            finished[b].append((score(s, len(seq)), seq))
    return [max(f, key=lambda x: x[0])[1] if f else [] for f in finished]


def _encode(encoder, batch, prefix_len, cache: KVCache | None) -> torch.Tensor:
    """The prefix-LM forward, filling ``cache`` (when given) with every layer's keys/values."""
    return encoder(batch, mask="prefix", prefix_len=prefix_len, cache=cache)


def _image_segments(model, images) -> list[Segment]:
    if isinstance(images, Segment):
        images = [images]
    if isinstance(images, torch.Tensor) or (images and not isinstance(images[0], Segment)):
        return [image_input(model, x) for x in images]
    return list(images)


def contrast(logp: torch.Tensor, prior: torch.Tensor, weight: float, cutoff: float
             ) -> torch.Tensor:
    """Log-probabilities of ``(1 + weight) logp - weight prior`` renormalised over the
    plausible tokens (``logp`` within ``log cutoff`` of its best; the others -inf)."""
    plausible = logp >= logp.max(-1, keepdim=True).values + math.log(cutoff)
    mixed = torch.where(plausible, (1 + weight) * logp - weight * prior,
                        torch.full_like(logp, float("-inf")))
    return mixed.log_softmax(-1)


@torch.no_grad()
def generate(model, images, beams: int | None = None, max_len: int | None = None,
             length_penalty: float | None = None, no_repeat_ngram: int | None = None,
             use_cache: bool = True, prior_weight: float | None = None) -> list[list[int]]:
    """Caption ids (``<eos>`` left out) of each image: ``images`` as the model reads them
    (uint8 pixels [B, 3, S, S] or patch features [B, P, d], or ``Segment``s of one length).
    Unset settings come from the model's caption head (else the defaults); greedy when
    ``beams`` is 1; ``prior_weight`` > 0 decodes against the language prior (see
    ``CaptionHeadConfig``). ``use_cache=False`` runs the full sequence every step (for
    tests)."""
    cfg = CaptionHeadConfig()
    if "caption" in model.heads:  # the settings it was fine-tuned with
        cfg = model.heads["caption"].cfg
    beams = cfg.beams if beams is None else beams
    max_len = cfg.max_len if max_len is None else max_len
    alpha = cfg.length_penalty if length_penalty is None else length_penalty
    ngram = cfg.no_repeat_ngram if no_repeat_ngram is None else no_repeat_ngram
    weight = cfg.prior_weight if prior_weight is None else prior_weight
    if beams < 1 or max_len < 1 or ngram < 0 or weight < 0:
        raise OmnimaskError(f"captioning needs beams >= 1, max_len >= 1, no_repeat_ngram >= 0,"
                            f" prior_weight >= 0; got {beams}, {max_len}, {ngram}, {weight}")
    vocab = model.vocab
    if vocab is None:
        raise OmnimaskError("the model has no vocabulary (load it from a model directory)")
    segs = _image_segments(model, images)
    if not segs:
        return []
    if len({len(s) for s in segs}) > 1:
        raise OmnimaskError(f"images of one captioning call give one number of tokens each; "
                            f"got {sorted({len(s) for s in segs})}")
    was_training = model.training
    model.eval()
    try:
        first, step = _decoder(model, [[s] for s in segs], use_cache)
        if weight:
            p_first, p_step = _decoder(model, [[] for _ in segs], use_cache)  # no image
            first = contrast(first, p_first, weight, cfg.prior_cutoff)
            own_step = step

            def step(rows: torch.Tensor, toks: torch.Tensor) -> torch.Tensor:
                return contrast(own_step(rows, toks), p_step(rows, toks), weight,
                                cfg.prior_cutoff)
        end = vocab.special(END)
        if beams == 1:
            return greedy_search(first, step, max_len, end, ngram)
        return beam_search(first, step, beams, max_len, end, alpha, ngram)
    finally:
        model.train(was_training)


def _decoder(model, prefixes: list[list[Segment]], use_cache: bool
             ) -> tuple[torch.Tensor, Step]:
    """``[prefix][<cls>]`` of each caption encoded once: the first token's log-probabilities
    [B, V] and the ``Step`` that extends the rows (on a KV cache, or the full sequence)."""
    enc, vocab = model.encoder, model.vocab
    start = torch.tensor([vocab.special(START)])
    plen = [sum(len(s) for s in p) + 1 for p in prefixes]
    allowed = None

    def log_probs(h: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        nonlocal allowed
        logits = enc.vocab_logits(h, pos.to(h.device)).float()
        if allowed is None:
            allowed = allowed_ids(vocab, logits.shape[-1]).to(logits.device)
        return logits.masked_fill(~allowed, float("-inf")).log_softmax(-1)

    prefix = pack([[*p, Segment("text", ids=start)] for p in prefixes])
    cache = KVCache() if use_cache else None
    h = _encode(enc, prefix, plen, cache)
    first = log_probs(h, prefix.cu_seqlens[1:].long() - 1)
    if use_cache:
        def step(rows: torch.Tensor, toks: torch.Tensor) -> torch.Tensor:
            cache.reorder(rows)
            h = enc.trunk.step(toks, cache)
            return log_probs(h, torch.arange(len(toks)))
        return first, step
    state = {"image": list(range(len(prefixes))), "seq": [[] for _ in prefixes]}

    def step(rows: torch.Tensor, toks: torch.Tensor) -> torch.Tensor:
        state["image"] = [state["image"][r] for r in rows.tolist()]
        state["seq"] = [state["seq"][r] + [t] for r, t in zip(rows.tolist(), toks.tolist())]
        p = pack([[*prefixes[i], Segment("text", ids=torch.cat([start, torch.tensor(s)]))]
                  for i, s in zip(state["image"], state["seq"])])
        h = _encode(enc, p, [plen[i] for i in state["image"]], None)
        return log_probs(h, p.cu_seqlens[1:].long() - 1)
    return first, step
