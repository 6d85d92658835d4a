"""CM3 causally-masked language modelling over image-text(-speech) documents, and
generation with the trained model (captions, images, infilling).

A document is ``<bos>`` then its parts in a random order: the caption's text ids;
``<image>`` VQ codes (raster order, shared vocabulary) ``</image>``; optionally
``<speech>`` the spoken caption's units ``</speech>``. The CM3 transform
(``cm3.py``) moves n ~ clamp(Poisson(1), 1, 16) spans to the end behind ``<mask:i>``
sentinels (spans never cover ``<bos>`` or the brackets), ``<eos>`` closes each moved
span and ``<eod>`` the document. The trunk runs causally; the loss is next-token
cross-entropy everywhere except where the next token is a sentinel (weight 0).

Image tokens keep 2-D (row, col) positions of where they were in the image, also after
the transform moved them; position ids count within the document.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omnimask.fusion.packing import IGNORE, Segment, pack

from .base import OBJECTIVES, Context, pick_caption
from .cm3 import cm3_transform, sample_spans


def _runs(ctx: Context, tokens: list[int]) -> list[tuple[str, int, int]]:
    """(modality, start, end) of each run of same-modality tokens."""
    r = ctx.vocab.ranges()
    mods = ["image" if r["image"][0] <= t < r["image"][1] else
            "speech" if r["speech"][0] <= t < r["speech"][1] else "text" for t in tokens]
    runs, s = [], 0
    for k in range(1, len(tokens) + 1):
        if k == len(tokens) or mods[k] != mods[s]:
            runs.append((mods[s], s, k))
            s = k
    return runs


def doc_segments(ctx: Context, tokens: list[int], grid_index: list[int], cols: int,
                 targets: list[int] | None = None) -> list[Segment]:
    """A token list as segments; image tokens get (row, col) from ``grid_index``."""
    segs = []
    for mod, s, e in _runs(ctx, tokens):
        ids = torch.tensor(tokens[s:e])
        tgt = None if targets is None else torch.tensor(targets[s:e])
        rc = None
        if mod == "image":
            g = torch.tensor(grid_index[s:e])
            rc = torch.stack([g // cols, g % cols], 1)
        segs.append(Segment(mod, ids=ids, targets=tgt, rc=rc))
    return segs


def grid_indices(ctx: Context, tokens: list[int]) -> list[int]:
    """For a document in reading order: each image token's index within its image."""
    lo, hi = ctx.vocab.ranges()["image"]
    out, k = [], 0
    for t in tokens:
        if t == ctx.sp("image"):
            k = 0
        if lo <= t < hi:
            out.append(k)
            k += 1
        else:
            out.append(-1)
    return out


@OBJECTIVES.register("cm3")
class CM3:
    def __init__(self, ctx: Context) -> None:
        self.ctx, self.cfg = ctx, ctx.cfg
        self.sentinels = [ctx.sp(f"mask:{i}") for i in range(self.cfg.cm3_max_spans)]
        self.brackets = {ctx.sp(r) for r in ("bos", "image", "/image", "speech", "/speech")}

    def document(self, corpus, i: int, gen: torch.Generator) -> list[int]:
        c, v = self.ctx, self.ctx.vocab
        text = list(pick_caption(corpus, i, gen))
        image = [c.sp("image"), *v.from_image(corpus.codes[i]).tolist(), c.sp("/image")]
        parts = [image, text] if float(torch.rand(1, generator=gen)) < self.cfg.cm3_image_first \
            else [text, image]
        if corpus.has_speech and float(torch.rand(1, generator=gen)) < self.cfg.cm3_speech:
            parts.append([c.sp("speech"), *v.from_speech(corpus.units[i]).tolist(),
                          c.sp("/speech")])
        return [c.sp("bos")] + [t for p in parts for t in p]

    def sample(self, corpus, i: int, gen: torch.Generator) -> list[Segment]:
        doc = self.document(corpus, i, gen)
        allowed = [t not in self.brackets for t in doc]
        spans = sample_spans(len(doc), gen, max_spans=self.cfg.cm3_max_spans,
                             poisson_lambda=self.cfg.cm3_poisson, allowed=allowed)
        eos, eod = self.ctx.sp("eos"), self.ctx.sp("eod")
        tokens, weight = cm3_transform(doc, spans, self.sentinels, eos, eod)
        # the same transform on positions tells where every token came from
        marks = [-(k + 1) for k in range(len(self.sentinels))]
        origin, _ = cm3_transform(list(range(len(doc))), spans, marks, -100, -200)
        gi = grid_indices(self.ctx, doc)
        grid = [gi[o] if o >= 0 else -1 for o in origin]
        targets = [tokens[k + 1] if weight[k + 1] > 0 else IGNORE
                   for k in range(len(tokens) - 1)] + [IGNORE]
        return doc_segments(self.ctx, tokens, grid, corpus.grid[1], targets)

    def batch(self, corpus, idx, gen) -> dict:
        return {"packed": pack([self.sample(corpus, i, gen) for i in idx])}

    def loss(self, model, b) -> dict:
        p = b["packed"]
        h = model.encode(p, mask="cm3")
        pos = p.target_positions
        loss = F.cross_entropy(model.vocab_logits(h, pos).float(), p.targets[pos].to(h.device))
        return {"loss": loss, "cm3": loss.detach(), "tokens": p.num_tokens}


# -- generation --------------------------------------------------------------------------------
@torch.no_grad()
def generate(model, ctx: Context, prompt: list[int], max_new: int, allowed: torch.Tensor,
             stop: set[int] = frozenset(), cols: int = 8, temperature: float = 0.0,
             top_k: int = 0, gen: torch.Generator | None = None,
             no_repeat_ngram: int = 0) -> list[int]:
    """Continue ``prompt`` token by token (causal trunk, no cache: prompts are short).
    ``allowed``: [vocab] bool, the ids that may be produced; greedy when temperature=0;
    ``no_repeat_ngram=n`` forbids repeating an n-gram of the generated part (fairseq's
    ``--no-repeat-ngram-size``)."""
    model.eval()
    tokens = list(prompt)
    dev = next(model.parameters()).device
    for _ in range(max_new):
        p = pack([doc_segments(ctx, tokens, grid_indices(ctx, tokens), cols)]).to(dev)
        h = model.encode(p, mask="causal")
        logits = model.vocab_logits(h, torch.tensor([len(tokens) - 1], device=dev))[0].float()
        logits = logits.masked_fill(~allowed.to(dev), float("-inf"))
        if no_repeat_ngram:
            for t in _banned(tokens[len(prompt):], no_repeat_ngram):
                logits[t] = float("-inf")
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = logits.topk(min(top_k, int(allowed.sum()))).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(logits.softmax(-1).cpu(), 1, generator=gen))
        tokens.append(nxt)
        if nxt in stop:
            break
    return tokens[len(prompt):]


def _banned(out: list[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already present in ``out``."""
    if len(out) < n:
        return set()
    head = tuple(out[len(out) - n + 1:]) if n > 1 else ()
    return {out[i + n - 1] for i in range(len(out) - n + 1) if tuple(out[i:i + n - 1]) == head}


def _text_allowed(ctx: Context, tokenizer) -> torch.Tensor:
    a = torch.zeros(ctx.vocab.size, dtype=torch.bool)
    a[: ctx.vocab.text_size] = True
    for i in range(ctx.vocab.text_size):
        if tokenizer.is_special(i):
            a[i] = False
    a[ctx.sp("eod")] = a[ctx.sp("eos")] = True
    return a


def caption_image(model, ctx: Context, tokenizer, codes: torch.Tensor, max_new: int = 40
                  ) -> str:
    """Greedy caption of one image's VQ codes: prompt ``<bos> <image> codes </image>``."""
    prompt = [ctx.sp("bos"), ctx.sp("image"), *ctx.vocab.from_image(codes).tolist(),
              ctx.sp("/image")]
    out = generate(model, ctx, prompt, max_new, _text_allowed(ctx, tokenizer),
                   stop={ctx.sp("eod"), ctx.sp("eos")}, no_repeat_ngram=3)
    return tokenizer.decode([t for t in out if not tokenizer.is_special(t)])


def image_from_caption(model, ctx: Context, caption_ids: list[int], num_codes: int, cols: int,
                       temperature: float = 1.0, top_k: int = 20,
                       gen: torch.Generator | None = None) -> torch.Tensor:
    """VQ codes [num_codes] for a caption: prompt ``<bos> caption <image>``."""
    lo, hi = ctx.vocab.ranges()["image"]
    allowed = torch.zeros(ctx.vocab.size, dtype=torch.bool)
    allowed[lo:hi] = True
    prompt = [ctx.sp("bos"), *caption_ids, ctx.sp("image")]
    out = generate(model, ctx, prompt, num_codes, allowed, cols=cols, temperature=temperature,
                   top_k=top_k, gen=gen)
    return ctx.vocab.to_image(torch.tensor(out))


def infill(model, ctx: Context, tokenizer, doc: list[int], start: int, end: int,
           max_new: int = 20) -> str:
    """Fill ``doc[start:end]`` given both sides (``doc`` as ``document`` builds it, from
    ``<bos>``): CM3's prompt ``... <mask:0> ... <mask:0>``, generated until ``<eos>``."""
    m = ctx.sp("mask:0")
    prompt = [*doc[:start], m, *doc[end:], m]
    out = generate(model, ctx, prompt, max_new, _text_allowed(ctx, tokenizer),
                   stop={ctx.sp("eos"), ctx.sp("eod")})
    return tokenizer.decode([t for t in out if not tokenizer.is_special(t)])
