"""Generation with a CM3-trained model: captions, images, infilling.

Inference calls the model's parts directly (``model.encoder``, ``model.heads[...]``): it is
not wrapped for data parallelism. Every prompt of a call is decoded at once. With the
key/value cache (the default) the prompts are run once, grouped by length (a cache holds
sequences of one length), and each step feeds one token per sequence through
``Encoder.step``; without it each step packs all live sequences into one batch (causal
mask per sample, no padding) and reads the logits at each one's last position (the
reference the cached path is tested against). Options:

- greedy or sampled decoding (temperature, top-k), fairseq's no-repeat-n-gram ban;
- classifier-free guidance (CM3Leon): each sequence is also continued after an
  unconditional prompt and the logits become ``u + s * (c - u)``; for images the
  unconditional prompt is ``<bos> <image>``, the start of CM3's image-first documents,
  so no extra training is needed;
- reranking (DALL-E and CM3 rerank samples with CLIP, BLIP filters captions with ITM):
  several candidate images per caption, or candidate captions per image, and the one the
  model's own ITC or ITM head scores highest is kept. A model that reads pixels scores
  candidate images as the VQ decoder draws them (the pixels it was trained on), one that
  reads VQ latents as their re-encoded latents.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from omnimask.errors import OmnimaskError
from omnimask.fusion.packing import Segment, pack
from omnimask.heads.captioning import banned_tokens, image_input

from .base import Context, text_segment
from .cm3_lm import doc_segments, doc_stacks, grid_indices, image_part, text_part, vocab_id


@torch.no_grad()
def next_logits(model, ctx: Context, seqs: list[list[int]], cols: int) -> torch.Tensor:
    """[len(seqs), vocab] float logits for the token after each sequence (causal)."""
    p = pack([doc_segments(ctx, s, grid_indices(ctx, s), cols) for s in seqs])
    h = model.encoder(p, mask="causal", stack=doc_stacks(ctx, seqs))  # moves it to the model
    return model.encoder.vocab_logits(h, p.cu_seqlens[1:].long().to(h.device) - 1).float()


class CachedDecoder:
    """Next-token logits of many sequences, one new token each per ``advance``: the
    sequences are run once with a ``KVCache`` per length group, then stepped. ``logits``:
    [sequences, vocab] for the token after each sequence as it stands."""

    def __init__(self, model, ctx: Context, seqs: list[list[int]], cols: int) -> None:
        from omnimask.fusion.trunk import KVCache

        self.model, self.ctx, self.cols = model, ctx, cols
        self.lo, self.hi = ctx.vocab.ranges()["image"]
        self.start = ctx.sp("image")
        # per sequence, the index within its image the next image token gets
        self.k = [grid_indices(ctx, [*s, self.lo])[-1] for s in seqs]
        by_len: dict[int, list[int]] = {}
        for r, s in enumerate(seqs):
            by_len.setdefault(len(s), []).append(r)
        self.groups, rows_logits = [], []
        for rows in by_len.values():
            cache = KVCache()
            p = pack([doc_segments(ctx, seqs[r], grid_indices(ctx, seqs[r]), cols)
                      for r in rows])
            h = model.encoder(p, mask="causal", cache=cache,
                              stack=doc_stacks(ctx, [seqs[r] for r in rows]))
            last = p.cu_seqlens[1:].long().to(h.device) - 1
            rows_logits.append(model.encoder.vocab_logits(h, last).float())
            self.groups.append((rows, cache))
        self.logits = self._gather(rows_logits, len(seqs))

    def _gather(self, per_group: list[torch.Tensor], n: int) -> torch.Tensor:
        out = per_group[0].new_empty(n, per_group[0].shape[1])
        for (rows, _), lg in zip(self.groups, per_group):
            out[torch.tensor(rows, device=out.device)] = lg
        return out

    @torch.no_grad()
    def advance(self, tokens: list[int]) -> torch.Tensor:
        """Append ``tokens[r]`` to sequence r; the new ``logits``."""
        grid = []
        for r, t in enumerate(tokens):
            image = self.lo <= t < self.hi
            grid.append(self.k[r] if image else -1)
            self.k[r] = 0 if t == self.start else self.k[r] + image
        per_group = []
        for rows, cache in self.groups:
            p = pack([doc_segments(self.ctx, [tokens[r]], [grid[r]], self.cols) for r in rows])
            h = self.model.encoder.step(p, cache)
            per_group.append(self.model.encoder.vocab_logits(
                h, torch.arange(len(rows), device=h.device)).float())
        self.logits = self._gather(per_group, len(tokens))
        return self.logits


@torch.no_grad()
def generate(model, ctx: Context, prompts: list[list[int]], max_new: int,
             allowed: torch.Tensor, stop: set[int] = frozenset(), cols: int = 8,
             temperature: float = 0.0, top_k: int = 0, gen: torch.Generator | None = None,
             no_repeat_ngram: int = 0, uncond: list[list[int]] | None = None,
             guidance: float = 1.0, use_cache: bool = True) -> list[list[int]]:
    """Continue every prompt (up to ``max_new`` tokens, or through a ``stop`` token).

    ``allowed``: [vocab] bool, the ids that may be produced. Greedy when temperature=0.
    ``uncond`` (one prompt per row) with ``guidance`` s: classifier-free guidance.
    ``use_cache=False`` runs every sequence in full at each step (the reference).
    Returns the generated ids per prompt (the stop token included when reached)."""
    if uncond is not None and len(uncond) != len(prompts):
        raise ValueError(f"uncond has {len(uncond)} prompts, prompts {len(prompts)}")
    model.eval()
    dev = next(model.parameters()).device
    ban = ~allowed.to(dev)
    outs: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))
    guided = uncond is not None and guidance != 1.0
    n = len(prompts)
    dec = (CachedDecoder(model, ctx, [*prompts, *(uncond if guided else [])], cols)
           if use_cache and max_new > 0 and prompts else None)
    for _ in range(max_new):
        if not live:
            break
        if dec is not None:  # every sequence advances; only the live ones are read
            rows = torch.tensor(live + ([n + k for k in live] if guided else []),
                                device=dec.logits.device)
            logits = dec.logits[rows]
        else:
            seqs = [prompts[k] + outs[k] for k in live]
            if guided:
                seqs += [uncond[k] + outs[k] for k in live]
            logits = next_logits(model, ctx, seqs, cols)
        if guided:
            c, u = logits[: len(live)].log_softmax(-1), logits[len(live):].log_softmax(-1)
            logits = u + guidance * (c - u)
        logits = logits.masked_fill(ban, float("-inf"))
        if no_repeat_ngram:
            for row, k in enumerate(live):
                for t in banned_tokens(outs[k], no_repeat_ngram):
                    logits[row, t] = float("-inf")
        nxt = _pick(logits, temperature, top_k, gen)
        for row, k in enumerate(live):
            outs[k].append(int(nxt[row]))
        live = [k for k in live if outs[k][-1] not in stop]
        if dec is not None and live:  # a finished sequence repeats its stop token
            last = [o[-1] for o in outs]
            dec.advance(last + (last if guided else []))
    return outs


def _pick(logits: torch.Tensor, temperature: float, top_k: int,
          gen: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        k = min(top_k, int(torch.isfinite(logits).sum(-1).min()))
        kth = logits.topk(k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1).cpu(), 1, generator=gen)[:, 0]


def text_allowed(ctx: Context, tokenizer) -> torch.Tensor:
    """[vocab] bool: the text tokens (no specials) plus ``<eos>``/``<eod>``."""
    a = torch.zeros(ctx.vocab.size, dtype=torch.bool)
    a[: ctx.vocab.text_size] = True
    for i in range(ctx.vocab.text_size):
        if tokenizer.is_special(i):
            a[i] = False
    a[ctx.sp("eod")] = a[ctx.sp("eos")] = True
    return a


def caption_images(model, ctx: Context, tokenizer, codes: torch.Tensor, max_new: int = 40,
                   no_repeat_ngram: int = 3, candidates: int = 1, temperature: float = 0.7,
                   top_k: int = 0,
                   score: Callable[[list[list[int]], int], torch.Tensor] | None = None,
                   gen: torch.Generator | None = None) -> list[str]:
    """Captions of images' VQ codes [B, P]: prompt ``<bos> <image> codes </image>``, each
    generated until the ``<sep>`` that closes a document's caption (or ``max_new`` tokens).

    Greedy; with ``candidates`` > 1 and ``score(captions, i) -> [C]`` (how well each caption
    fits image ``i``; ``captions[0]`` is the greedy one) the greedy caption and
    ``candidates - 1`` sampled ones compete and the best scored is kept, as BLIP's CapFilt
    filters captions with its matching head."""
    prompts = [[ctx.sp("bos"), *image_part(ctx, c)] for c in codes]
    allowed = text_allowed(ctx, tokenizer)
    allowed[ctx.sp("sep")] = True
    stop = {ctx.sp("sep"), ctx.sp("eod"), ctx.sp("eos")}
    outs = generate(model, ctx, prompts, max_new, allowed, stop=stop,
                    no_repeat_ngram=no_repeat_ngram)
    words = [[t for t in o if not tokenizer.is_special(t)] for o in outs]
    if candidates > 1 and score is not None:
        n = candidates - 1
        more = generate(model, ctx, [p for p in prompts for _ in range(n)], max_new, allowed,
                        stop=stop, temperature=temperature, top_k=top_k, gen=gen,
                        no_repeat_ngram=no_repeat_ngram)
        for i in range(len(prompts)):
            cands = [words[i]] + [[t for t in o if not tokenizer.is_special(t)]
                                  for o in more[i * n:(i + 1) * n]]
            words[i] = cands[int(score(cands, i).argmax())]
    return [tokenizer.decode(w) for w in words]


def images_from_captions(model, ctx: Context, captions: list[list[int]], num_codes: int,
                         cols: int, temperature: float = 1.0, top_k: int = 0,
                         guidance: float = 1.0, candidates: int = 1,
                         score: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None,
                         gen: torch.Generator | None = None) -> torch.Tensor:
    """VQ codes [len(captions), num_codes], prompt ``<bos> caption <sep> <image>``.

    ``candidates`` > 1 samples that many per caption and keeps the one ``score(caption,
    codes [candidates, num_codes]) -> [candidates]`` rates highest (the first without
    ``score``). One code per position: an rq tokenizer's stacks are drawn by MaskGIT."""
    if ctx.depth > 1:
        raise OmnimaskError("CM3 draws one image code per position; an rq tokenizer's id "
                            "stacks are drawn by MaskGIT (sampler=maskgit)")
    lo, hi = ctx.vocab.ranges()["image"]
    allowed = torch.zeros(ctx.vocab.size, dtype=torch.bool)
    allowed[lo:hi] = True
    prompts = [[ctx.sp("bos"), *text_part(ctx, c), ctx.sp("image")]
               for c in captions for _ in range(candidates)]
    uncond = [[ctx.sp("bos"), ctx.sp("image")]] * len(prompts)
    outs = generate(model, ctx, prompts, num_codes, allowed, cols=cols, temperature=temperature,
                    top_k=top_k, gen=gen, uncond=uncond, guidance=guidance)
    codes = ctx.vocab.to_image(torch.tensor(outs)).view(len(captions), candidates, num_codes)
    if candidates == 1 or score is None:
        return codes[:, 0]
    best = [int(score(c, codes[k]).argmax()) for k, c in enumerate(captions)]
    return codes[torch.arange(len(captions)), torch.tensor(best)]


@torch.no_grad()
def itm_scores(model, ctx: Context, captions: list[list[int]], images: torch.Tensor
               ) -> torch.Tensor:
    """[C] probability that ``captions[k]`` matches image ``images[k]`` (what the model
    reads: [C, P, d] patch features, or uint8 pixels [C, 3, S, S])."""
    _check_pairs(captions, images)
    model.eval()
    p = pack([[text_segment(ctx, c), image_input(model, x)] for c, x in zip(captions, images)])
    h = model.encoder(p)
    return model.heads["itm"].logits(model.encoder, h, p).float().softmax(-1)[:, 1].cpu()


@torch.no_grad()
def itc_scores(model, ctx: Context, captions: list[list[int]], images: torch.Tensor
               ) -> torch.Tensor:
    """[C] cosine between the ITC embeddings of ``captions[k]`` and image ``images[k]``
    (as ``itm_scores`` takes them)."""
    _check_pairs(captions, images)
    model.eval()
    cls = torch.tensor([ctx.sp("cls")])
    samples = [[text_segment(ctx, c)] for c in captions] + [
        [Segment("text", ids=cls), image_input(model, x)] for x in images]
    t, v = model.heads["itc"].embed(model.encoder, pack(samples), len(captions))
    return (v * t).sum(-1).float().cpu()


def _check_pairs(captions: list[list[int]], images: torch.Tensor) -> None:
    if len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions but {len(images)} images: the scores "
                         "are pairwise (caption k with image k)")


def infill(model, ctx: Context, tokenizer, doc: list[int], start: int, end: int,
           max_new: int = 20) -> str:
    """Fill ``doc[start:end]`` given both sides (``doc`` from ``<bos>``): CM3's prompt
    ``... <mask:0> ... <mask:0>``, generated until ``<eos>``."""
    m = ctx.sp("mask:0")
    out = generate(model, ctx, [[*doc[:start], m, *doc[end:], m]], max_new,
                   text_allowed(ctx, tokenizer), stop={ctx.sp("eos"), ctx.sp("eod")})[0]
    return tokenizer.decode([t for t in out if not tokenizer.is_special(t)])


def image_scorer(model, ctx: Context, image_tokenizer, rerank: str = "itc"
                 ) -> Callable[[list[int], torch.Tensor], torch.Tensor]:
    """``score(caption, codes [C, P]) -> [C]``: the model's ``rerank`` head (itc or itm) on
    the caption with each candidate image, read as the model reads images."""
    head = itc_scores if rerank == "itc" else itm_scores
    feats_of = rerank_features(image_tokenizer, ctx.pixels)
    return lambda cap, codes: head(model, ctx, [cap] * len(codes), feats_of(codes))


def rerank_features(image_tokenizer, pixels: bool = False
                    ) -> Callable[[torch.Tensor], torch.Tensor]:
    """codes [C, P] -> what the scoring model reads of the decoded images: VQ features
    [C, P, d] as the corpus builds its ``vq`` features (decode, encode, l2-normalise), or
    (``pixels``) the decoded uint8 pixels [C, 3, S, S] themselves."""
    vq = image_tokenizer.model
    if pixels:
        return lambda codes: vq.decode(codes)
    return lambda codes: vq.unit_latents(vq.decode(codes))


@torch.no_grad()
def grounding(model, ctx: Context, corpus, idx: list[int]) -> dict[str, float]:
    """Whether CM3 uses the other modality: the mean next-token loss on the image tokens of
    ``<bos> caption <sep> <image> codes </image>`` with each image's own caption and another
    sample's (the list rotated by one), and on the caption tokens of image-first documents
    with the own and another image. Equal pairs: the model ignores the other modality."""
    model.eval()
    dev = next(model.parameters()).device
    caps = [text_part(ctx, corpus.captions[i][0]) for i in idx]
    imgs = [image_part(ctx, corpus.codes[i]) for i in idx]
    other = caps[1:] + caps[:1]
    other_img = imgs[1:] + imgs[:1]
    bos = ctx.sp("bos")
    lo, hi = ctx.vocab.ranges()["image"]
    specials = torch.tensor(sorted(ctx.vocab.specials.values()), device=dev)
    out = {}
    for name, docs, want_image in (
            ("image_given_caption", [[bos, *c, *m] for c, m in zip(caps, imgs)], True),
            ("image_given_other_caption", [[bos, *c, *m] for c, m in zip(other, imgs)], True),
            ("caption_given_image", [[bos, *m, *c] for c, m in zip(caps, imgs)], False),
            ("caption_given_other_image", [[bos, *m, *c] for c, m in zip(caps, other_img)],
             False)):
        p = pack([doc_segments(ctx, d, grid_indices(ctx, d), corpus.grid[1]) for d in docs])
        h = model.encoder(p, mask="causal", stack=doc_stacks(ctx, docs))
        nxt = torch.cat([torch.tensor([vocab_id(ctx, t) for t in d[1:]] + [-1])
                         for d in docs]).to(dev)
        is_image = (nxt >= lo) & (nxt < hi)
        words = (nxt >= 0) & (nxt < ctx.vocab.text_size) & ~torch.isin(nxt, specials)
        keep = is_image if want_image else words
        pos = torch.nonzero(keep).flatten()
        out[name] = round(float(F.cross_entropy(model.encoder.vocab_logits(h, pos).float(), nxt[pos])), 4)
    return out
