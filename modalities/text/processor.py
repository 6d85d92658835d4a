"""Text-side processors: captions, questions, referring expressions, metadata."""

from __future__ import annotations

from ..base import register_processor


@register_processor("text", keys=("caption.txt",))
def make_text(cfg):
    def fn(d):
        caps = [c.strip() for c in d["caption.txt"].splitlines() if c.strip()]
        if not caps:
            raise ValueError("caption.txt holds no caption")
        return {"captions": caps}

    return fn


@register_processor("qa", keys=("qa.json",))
def make_qa(cfg):
    def fn(d):
        qa = d["qa.json"]
        if not isinstance(qa, list) or not all("question" in q and "answer" in q for q in qa):
            raise ValueError("qa.json must be a list of {question, answer, ...}")
        return {"qa": qa}

    return fn


@register_processor("refs", keys=("refs.json",))
def make_refs(cfg):
    return lambda d: {"refs": d["refs.json"]}


@register_processor("meta", keys=("meta.json",))
def make_meta(cfg):
    return lambda d: {"meta": d["meta.json"]}
