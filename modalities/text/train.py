"""``omnimask tokenizer train|eval text``: corpus from shards, training, evaluation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from omnimask.config import DataConfig, load_config
from omnimask.errors import OmnimaskError
from omnimask.registry import TOKENIZERS

from ..vocab import FILE as VOCAB_FILE
from .tokenizer import TextTokenizer, TextTokenizerConfig


def iter_texts(shards: list[str]) -> Iterator[str]:
    """Captions, questions, answers and referring expressions of every sample, in order."""
    return (text for _, text in iter_labelled_texts(shards))


def iter_labelled_texts(shards: list[str]) -> Iterator[tuple[str, str]]:
    """``(kind, text)`` with kind caption, question, answer or expression."""
    from omnimask.train.data.pipeline import ShardLoader
    from omnimask.train.data.shards import expand_shards, shard_keys

    paths = expand_shards(shards)
    keys = shard_keys(paths)
    procs = ["text"] + [p for p, k in (("qa", "qa.json"), ("refs", "refs.json")) if k in keys]
    cfg = DataConfig(shards=paths, processors=procs, batch_size=256, shuffle_buffer=0,
                     shuffle_shards=False)
    for b in ShardLoader(cfg, rank=0, world_size=1):
        for i in range(len(b["__key__"])):
            for c in b["captions"][i]:
                yield "caption", c
            for q in b.get("qa", [[]] * len(b["__key__"]))[i]:
                yield "question", q["question"]
                yield "answer", str(q["answer"])
            for r in b.get("refs", [[]] * len(b["__key__"]))[i]:
                yield "expression", r["expression"]


@TOKENIZERS.register("text")
class TextTokenizerOps:
    config = TextTokenizerConfig

    @staticmethod
    def train(data: list[str], out: str, overrides=(), progress: bool = True) -> dict:
        cfg = load_config(TextTokenizerConfig, None, overrides)
        if cfg.from_file:
            tok = TextTokenizer.from_file(cfg.from_file, cfg.num_sentinels)
        else:
            texts = list(iter_texts(data))
            if not texts:
                raise OmnimaskError("no text found in the shards")
            tok = TextTokenizer.train(texts, cfg)
        tok.save(out)
        tok.vocab().save(Path(out) / VOCAB_FILE)
        return {"kind": "text", "out": str(out), "vocab_size": tok.vocab_size}

    @staticmethod
    def evaluate(tokenizer: str, data: list[str], progress: bool = True) -> dict:
        tok = TextTokenizer.load(tokenizer)
        unk = tok.roles["unk"]
        n_text = n_tok = n_unk = exact = n_caps = cap_tokens = 0
        for kind, text in iter_labelled_texts(data):  # one pass over the shards
            ids = tok.encode(text)
            n_text += 1
            n_tok += len(ids)
            n_unk += sum(i == unk for i in ids)
            exact += tok.decode(ids) == text
            if kind == "caption":
                n_caps += 1
                cap_tokens += len(ids)
        return {"kind": "text", "vocab_size": tok.vocab_size, "texts": n_text,
                "tokens_per_caption": round(cap_tokens / max(n_caps, 1), 3),
                "tokens_per_text": round(n_tok / max(n_text, 1), 3),
                "unknown_rate": n_unk / max(n_tok, 1),
                "roundtrip_exact": exact / max(n_text, 1)}
