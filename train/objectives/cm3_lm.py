"""CM3 causally-masked language modelling over image-text(-speech) documents (generation
with the trained model: ``cm3_generate.py``).

A document is ``<bos>`` then its parts in a random order: the caption's text ids closed
by ``<sep>`` (the caption's end is then a token the model learns, so generated captions
stop; without it an image-first caption is followed only by a weightless sentinel);
``<image>`` VQ codes (raster order, shared vocabulary) ``</image>``; optionally
``<speech>`` the spoken caption's units ``</speech>``. The CM3 transform
(``cm3.py``) moves n ~ clamp(Poisson(1), 1, 16) spans to the end behind ``<mask:i>``
sentinels (spans never cover ``<bos>``, ``<sep>`` or the brackets), ``<eos>`` closes each moved
span and ``<eod>`` the document. The trunk runs causally; the loss is next-token
cross-entropy everywhere except where the next token is a sentinel (weight 0).

Image tokens keep 2-D (row, col) positions of where they were in the image, also after
the transform moved them; position ids count within the document. An rq tokenizer's id
stacks: a position is one token that enters as the sum of its levels' embeddings (as in
MaskGIT), and CM3 predicts the next position's first level; in the token lists such a
token is an id past the vocabulary that encodes the stack (``stack_tokens``), turned into
its first level's id and the trunk's ``stack`` input when packed (``doc_segments``,
``doc_stacks``).
"""

from __future__ import annotations

import torch

from omnimask.fusion.packing import IGNORE, Segment, pack

from .base import Context, Objective, TokenPrediction, objective, pick_caption
from .cm3 import cm3_transform, sample_spans


def stack_tokens(ctx: Context, codes: torch.Tensor) -> list[int]:
    """Id stacks [P * depth] (each level's own codes) -> one token per position: the
    vocabulary size plus the stack's mixed-radix number (level k's code times size^k)."""
    size = ctx.level_size()
    radix = size ** torch.arange(ctx.depth)
    return (codes.long().view(-1, ctx.depth) * radix).sum(1).add(ctx.vocab.size).tolist()


def is_image_token(ctx: Context):
    """A test of tokens: an image code, or a stack token."""
    (lo, hi), v = ctx.vocab.ranges()["image"], ctx.vocab.size
    return lambda t: lo <= t < hi or t >= v


def _levels(ctx: Context, t: int) -> list[int]:
    """A stack token's vocabulary ids, level by level."""
    lo, size, n = ctx.vocab.ranges()["image"][0], ctx.level_size(), t - ctx.vocab.size
    return [lo + k * size + (n // size ** k) % size for k in range(ctx.depth)]


def vocab_id(ctx: Context, t: int) -> int:
    """The id the trunk reads and predicts for a token: a stack's first level."""
    return _levels(ctx, t)[0] if t >= ctx.vocab.size else t


def doc_stacks(ctx: Context, docs: list[list[int]]) -> torch.Tensor | None:
    """The trunk's ``stack`` input [sum of lengths, depth] of token lists packed in order
    (-1 rows: not a stack); None without id stacks."""
    if ctx.depth == 1:
        return None
    return torch.tensor([_levels(ctx, t) if t >= ctx.vocab.size else [-1] * ctx.depth
                         for d in docs for t in d], dtype=torch.long)


def text_part(ctx: Context, ids) -> list[int]:
    """A caption's ids as a document part: closed by ``<sep>``."""
    return [*ids, ctx.sp("sep")]


def image_part(ctx: Context, codes: torch.Tensor) -> list[int]:
    """An image's VQ codes [P * depth] as a document part: ``<image> codes </image>`` (id
    stacks: one ``stack_tokens`` token per position)."""
    ids = ctx.vocab.from_image(codes).tolist() if ctx.depth == 1 else stack_tokens(ctx, codes)
    return [ctx.sp("image"), *ids, ctx.sp("/image")]


def _runs(ctx: Context, tokens: list[int]) -> list[tuple[str, int, int]]:
    """(modality, start, end) of each run of same-modality tokens."""
    r, image = ctx.vocab.ranges(), is_image_token(ctx)
    mods = ["image" if image(t) else
            "speech" if r["speech"][0] <= t < r["speech"][1] else "text" for t in tokens]
    runs, s = [], 0
    for k in range(1, len(tokens) + 1):
        if k == len(tokens) or mods[k] != mods[s]:
            runs.append((mods[s], s, k))
            s = k
    return runs


def doc_segments(ctx: Context, tokens: list[int], grid_index: list[int], cols: int,
                 targets: list[int] | None = None) -> list[Segment]:
    """A token list as segments; image tokens get (row, col) from ``grid_index``; stack
    tokens (ids and targets) become their first level's id."""
    segs = []
    for mod, s, e in _runs(ctx, tokens):
        ids = torch.tensor([vocab_id(ctx, t) for t in tokens[s:e]])
        tgt = (None if targets is None
               else torch.tensor([vocab_id(ctx, t) for t in targets[s:e]]))
        rc = None
        if mod == "image":
            g = torch.tensor(grid_index[s:e])
            rc = torch.stack([g // cols, g % cols], 1)
        segs.append(Segment(mod, ids=ids, targets=tgt, rc=rc))
    return segs


def grid_indices(ctx: Context, tokens: list[int]) -> list[int]:
    """For a document in reading order: each image token's index within its image."""
    out, k, image, start = [], 0, is_image_token(ctx), ctx.sp("image")
    for t in tokens:
        if t == start:
            k = 0
        if image(t):
            out.append(k)
            k += 1
        else:
            out.append(-1)
    return out


class CM3Head(TokenPrediction):
    """Next-token cross-entropy through the vocabulary head, the trunk run with CM3's mask
    (id stacks: the batch's ``stack`` input; a stack's first level is its target)."""

    task, mask = "cm3", "cm3"


@objective("cm3")
class CM3(Objective):
    head = CM3Head

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.sentinels = [ctx.sp(f"mask:{i}") for i in range(self.cfg.cm3_max_spans)]
        self.brackets = {ctx.sp(r) for r in ("bos", "sep", "image", "/image", "speech",
                                             "/speech")}

    def document(self, corpus, i: int, gen: torch.Generator) -> list[int]:
        c, v = self.ctx, self.ctx.vocab
        text = text_part(c, pick_caption(corpus, i, gen))
        image = image_part(c, corpus.codes[i])
        parts = [image, text] if float(torch.rand(1, generator=gen)) < self.cfg.cm3_image_first \
            else [text, image]
        if corpus.has_speech and float(torch.rand(1, generator=gen)) < self.cfg.cm3_speech:
            parts.append([c.sp("speech"), *v.from_speech(corpus.units[i]).tolist(),
                          c.sp("/speech")])
        return [c.sp("bos")] + [t for p in parts for t in p]

    def tokens(self, corpus, i: int, gen: torch.Generator):
        """A transformed document: (tokens, each one's grid index, next-token targets)."""
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
        return tokens, grid, targets

    def sample(self, corpus, i: int, gen: torch.Generator) -> list[Segment]:
        tokens, grid, targets = self.tokens(corpus, i, gen)
        return doc_segments(self.ctx, tokens, grid, corpus.grid[1], targets)

    def batch(self, corpus, idx, gen) -> dict:
        docs = [self.tokens(corpus, i, gen) for i in idx]
        p = pack([doc_segments(self.ctx, t, g, corpus.grid[1], y) for t, g, y in docs])
        stack = doc_stacks(self.ctx, [t for t, _, _ in docs])
        return {"packed": p} if stack is None else {"packed": p, "stack": stack}
