"""Captions, typed questions and referring expressions generated from a scene.

Every question carries the ``program`` it was generated from (a filter over object
attributes and a query), so its answer can be recomputed from ``meta.json``. Questions
that name an object are asked only when the description picks out exactly one object.
"""

from __future__ import annotations

import itertools

import numpy as np

from .scene import SceneObject
from .vocab import COLOR_NAMES, NUMBER_WORDS, PLURAL, SHAPES, SIZES

ATTRS = ("size", "color", "shape")
RELATION_MARGIN = 0.15  # of the image side: centres must differ by this much for a relation
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
REL_PHRASES = {"left": ("left of", "to the left of"), "right": ("right of", "to the right of"),
               "above": ("above",), "below": ("below", "beneath")}


def matches(o: SceneObject | dict, filt: dict[str, str]) -> bool:
    get = o.get if isinstance(o, dict) else lambda k: getattr(o, k)
    return all(get(k) == v for k, v in filt.items())


SHAPE_WORDS = {**{s: s for s in SHAPES}, **{p: s for s, p in PLURAL.items()}}  # word -> shape


def named_objects(text: str) -> set[tuple[str, str]]:
    """The (colour, shape) pairs a caption names: each shape word (or plural) with the
    colour word before it ("two large red crosses" -> ("red", "cross")); a shape without
    a colour ("the square") names none."""
    words = SHAPE_WORDS
    out, colour = set(), None
    for t in text.lower().replace(".", " ").replace(",", " ").split():
        if t in COLOR_NAMES:
            colour = t
        elif t in words and colour is not None:
            out.add((colour, words[t]))
            colour = None
    return out


def named_count(text: str) -> int:
    """How many objects a caption introduces: shape words whose phrase starts with "a" or
    "an" ("a small red hexagon"); "the red hexagon" refers back to one already named.
    ShapesWorld's captions name every object, so this is the scene's object count."""
    words = SHAPE_WORDS
    n, pending = 0, False
    for t in text.lower().replace(".", " ").replace(",", " ").replace(":", " ").split():
        if t in ("a", "an"):
            pending = True
        elif t == "the":
            pending = False
        elif t in words and pending:
            n, pending = n + 1, False
    return n


def relations(a: SceneObject, b: SceneObject, size: int) -> list[str]:
    """Relations r such that 'a is r of b' holds clearly (centres apart by the margin)."""
    m = RELATION_MARGIN * size
    (ax, ay), (bx, by) = a.center, b.center
    out = []
    if bx - ax >= m:
        out.append("left")
    if ax - bx >= m:
        out.append("right")
    if by - ay >= m:
        out.append("above")
    if ay - by >= m:
        out.append("below")
    return out


def describe(filt: dict[str, str], plural: bool = False) -> str:
    words = [filt[k] for k in ("size", "color") if k in filt]
    shape = filt.get("shape")
    noun = (PLURAL[shape] if plural else shape) if shape else ("objects" if plural else "object")
    return " ".join([*words, noun])


def article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def full_filter(o: SceneObject) -> dict[str, str]:
    return {"size": o.size, "color": o.color, "shape": o.shape}


def unique_filter(o: SceneObject, objs: list[SceneObject], pool: tuple[str, ...],
                  rng: np.random.Generator) -> dict[str, str] | None:
    """The smallest attribute filter from ``pool`` that matches ``o`` alone (ties: random)."""
    for k in range(1, len(pool) + 1):
        subsets = list(itertools.combinations(pool, k))
        for i in rng.permutation(len(subsets)):
            filt = {a: getattr(o, a) for a in subsets[i]}
            if sum(matches(x, filt) for x in objs) == 1:
                return filt
    return None


def _location(o: SceneObject, size: int) -> str:
    x, y = o.center
    col = ("left", "center", "right")[min(int(3 * x / size), 2)]
    row = ("top", "middle", "bottom")[min(int(3 * y / size), 2)]
    if col == "center" and row == "middle":
        return "in the center"
    if row == "middle":
        return f"on the {col}"
    if col == "center":
        return f"at the {row}"
    return f"at the {row} {col}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def captions(objs: list[SceneObject], size: int, rng: np.random.Generator) -> list[str]:
    """Three captions in different phrasings; each names every object."""
    order = [objs[i] for i in rng.permutation(len(objs))]
    nps = [article(describe(full_filter(o))) for o in order]
    n = len(objs)
    prefix = ("", "there is ", "an image of ", "a picture showing ", "this scene contains ")
    listing = prefix[int(rng.integers(len(prefix)))] + _join(nps)
    counted = (f"one object: {nps[0]}" if n == 1
               else f"there are {NUMBER_WORDS[n]} objects: {_join(nps)}")
    if n == 1:
        relational = f"{nps[0]} {_location(order[0], size)}"
    else:
        parts = [nps[0]]
        for prev, cur, np_ in zip(order, order[1:], nps[1:]):
            rels = relations(cur, prev, size)
            if rels:
                r = rels[int(rng.integers(len(rels)))]
                ref = unique_filter(prev, objs, ATTRS, rng) or full_filter(prev)
                phr = REL_PHRASES[r][int(rng.integers(len(REL_PHRASES[r])))]
                parts.append(f"{np_} {phr} the {describe(ref)}")
            else:
                parts.append(np_)
        relational = _join(parts)
    caps = [relational, listing, counted]
    return [caps[i] for i in rng.permutation(3)]


def _q_attribute(query: str, objs, rng) -> dict | None:
    pool = tuple(a for a in ATTRS if a != query)
    for i in rng.permutation(len(objs)):
        o = objs[i]
        filt = unique_filter(o, objs, pool, rng)
        if filt is None:
            continue
        d = describe(filt)
        text = {"color": f"what color is the {d}?", "shape": f"what shape is the {d}?",
                "size": f"what size is the {d}?"}[query]
        return {"question": text, "answer": getattr(o, query), "type": query,
                "program": {"query": query, "filter": filt}, "grounding": [[o.id]]}
    return None


def _random_filter(keys: tuple[str, ...], rng) -> dict[str, str]:
    vocab = {"shape": SHAPES, "color": COLOR_NAMES, "size": tuple(SIZES)}
    return {k: vocab[k][int(rng.integers(len(vocab[k])))] for k in keys}


def _q_count(objs, rng) -> dict:
    choices = ((), ("color",), ("shape",), ("color", "shape"), ("size", "shape"), ("size",))
    keys = choices[int(rng.integers(len(choices)))]
    if rng.random() < 0.7:
        o = objs[int(rng.integers(len(objs)))]
        filt = {k: getattr(o, k) for k in keys}
    else:
        filt = _random_filter(keys, rng)
    hits = [o.id for o in objs if matches(o, filt)]
    return {"question": f"how many {describe(filt, plural=True)} are there?",
            "answer": str(len(hits)), "type": "count",
            "program": {"query": "count", "filter": filt}, "grounding": [hits]}


def _q_exists(objs, rng) -> dict:
    choices = (("color", "shape"), ("shape",), ("size", "shape"), ("size", "color", "shape"))
    keys = choices[int(rng.integers(len(choices)))]
    want = rng.random() < 0.5
    filt = None
    if want:
        o = objs[int(rng.integers(len(objs)))]
        filt = {k: getattr(o, k) for k in keys}
    else:
        for _ in range(50):
            cand = _random_filter(keys, rng)
            if not any(matches(o, cand) for o in objs):
                filt = cand
                break
        if filt is None:  # every candidate present: ask about one that is
            o = objs[int(rng.integers(len(objs)))]
            filt = {k: getattr(o, k) for k in keys}
    hits = [o.id for o in objs if matches(o, filt)]
    return {"question": f"is there {article(describe(filt))}?", "answer": "yes" if hits else "no",
            "type": "exists", "program": {"query": "exists", "filter": filt},
            "grounding": [hits]}


def _q_relation(objs, size, rng) -> dict | None:
    pairs = [(a, b) for a in objs for b in objs if a is not b and relations(a, b, size)]
    for i in rng.permutation(len(pairs)):
        a, b = pairs[i]
        fa, fb = unique_filter(a, objs, ATTRS, rng), unique_filter(b, objs, ATTRS, rng)
        if fa is None or fb is None:
            continue
        rels = relations(a, b, size)
        r = rels[int(rng.integers(len(rels)))]
        yes = rng.random() < 0.5
        asked = r if yes else OPPOSITE[r]
        phr = REL_PHRASES[asked][int(rng.integers(len(REL_PHRASES[asked])))]
        return {"question": f"is the {describe(fa)} {phr} the {describe(fb)}?",
                "answer": "yes" if yes else "no", "type": "relation",
                "program": {"query": "relation", "relation": asked, "subject": fa, "object": fb},
                "grounding": [[a.id], [b.id]]}
    return None


def questions(objs: list[SceneObject], size: int, rng: np.random.Generator) -> list[dict]:
    """One question of each type that the scene allows (at most six). Each names the
    instance ids its answer looks at (``grounding``, GQA's question-to-object pointers):
    one list per role of its program (the relation's subject, then its object)."""
    qs = [_q_attribute("color", objs, rng), _q_attribute("shape", objs, rng),
          _q_attribute("size", objs, rng), _q_count(objs, rng), _q_exists(objs, rng),
          _q_relation(objs, size, rng)]
    return [q for q in qs if q is not None]


def referring_expressions(objs: list[SceneObject], size: int, rng: np.random.Generator
                          ) -> list[dict]:
    """One expression per object that can be singled out, by attributes or by position."""
    refs = []
    m = RELATION_MARGIN * size
    for o in objs:
        filt = unique_filter(o, objs, ATTRS, rng)
        if filt is not None:
            refs.append({"expression": f"the {describe(filt)}", "instance": o.id, "filter": filt})
            continue
        full = full_filter(o)
        twins = [x for x in objs if x is not o and matches(x, full)]
        for where, key, sign in (("on the left", 0, 1), ("on the right", 0, -1),
                                 ("at the top", 1, 1), ("at the bottom", 1, -1)):
            if all(sign * (t.center[key] - o.center[key]) >= m for t in twins):
                refs.append({"expression": f"the {describe(full)} {where}", "instance": o.id,
                             "filter": full, "position": where})
                break
    return refs
