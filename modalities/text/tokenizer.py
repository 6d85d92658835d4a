"""Text tokenizer: byte-level BPE trained with Hugging Face ``tokenizers``, or any existing
``tokenizer.json`` (a BERT WordPiece one, say) with omnimask's special tokens added.

Saved as a directory that both omnimask and ``transformers.AutoTokenizer`` load
(``tokenizer.json`` + ``tokenizer_config.json``), plus ``omnimask_text.json`` (the roles of
the special tokens and a fingerprint of the token table).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from omnimask.config import check_fields
from omnimask.errors import OmnimaskError

from ..vocab import Vocab

BASE_SPECIALS = {"pad": "<pad>", "unk": "<unk>", "cls": "<cls>", "sep": "<sep>",
                 "mask": "<mask>", "bos": "<bos>", "eos": "<eos>",
                 "image": "<image>", "/image": "</image>", "speech": "<speech>",
                 "/speech": "</speech>", "eod": "<eod>"}
# Tokens a foreign tokenizer may already have for a role.
ALIASES = {"pad": ("[PAD]", "<pad>"), "unk": ("[UNK]", "<unk>"), "cls": ("[CLS]", "<cls>"),
           "sep": ("[SEP]", "<sep>"), "mask": ("[MASK]", "<mask>"), "bos": ("<s>", "<bos>"),
           "eos": ("</s>", "<eos>")}
META = "omnimask_text.json"


def special_tokens(num_sentinels: int) -> dict[str, str]:
    """Role -> token; CM3 sentinels are roles ``mask:0`` ... ``mask:K-1`` (``<mask:i>``)."""
    return {**BASE_SPECIALS, **{f"mask:{i}": f"<mask:{i}>" for i in range(num_sentinels)}}


@dataclass
class TextTokenizerConfig:
    vocab_size: int = 2048
    min_frequency: int = 2
    num_sentinels: int = 16  # CM3: up to 16 masked spans per document
    from_file: str | None = None  # use this tokenizer.json (or directory) instead of training

    def __post_init__(self) -> None:
        check_fields(self, ">=1", "vocab_size")
        check_fields(self, ">=0", "min_frequency", "num_sentinels")


def _fingerprint(tok: Tokenizer) -> str:
    table = json.dumps(sorted(tok.get_vocab(with_added_tokens=True).items()))
    return hashlib.sha256(table.encode()).hexdigest()[:16]


def _portable_json(tok: Tokenizer) -> str:
    """``tokenizer.json`` that tokenizers 0.19 (transformers 4.40) reads too: BPE merges as
    "a b" strings, the older form every later version still reads (a pair form only when a
    token holds a space, which byte-level BPE tokens never do)."""
    data = json.loads(tok.to_str())
    merges = data.get("model", {}).get("merges")
    if merges and isinstance(merges[0], list) and not any(" " in x for m in merges for x in m):
        data["model"]["merges"] = [" ".join(m) for m in merges]
    return json.dumps(data, ensure_ascii=False, indent=2) + "\n"


def _role_tokens(tok: Tokenizer, num_sentinels: int) -> tuple[dict[str, str], list[str]]:
    """Role -> the token that fills it (an alias such as ``[CLS]`` when the tokenizer has
    one), and omnimask's tokens for the roles it lacks."""
    vocab = tok.get_vocab(with_added_tokens=True)
    roles, missing = {}, []
    for role, token in special_tokens(num_sentinels).items():
        found = next((a for a in ALIASES.get(role, (token,)) if a in vocab), None)
        if found is None:
            missing.append(token)
        roles[role] = found or token
    return roles, missing


class TextTokenizer:
    def __init__(self, tok: Tokenizer, roles: dict[str, int]) -> None:
        self.tok = tok
        self.roles = roles  # role -> id
        self._special_ids = set(roles.values())

    # -- construction -------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], cfg: TextTokenizerConfig) -> TextTokenizer:
        specials = special_tokens(cfg.num_sentinels)
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                      special_tokens=list(specials.values()), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer)
        return cls(tok, {r: tok.token_to_id(t) for r, t in specials.items()})

    @classmethod
    def from_file(cls, path: str | os.PathLike, num_sentinels: int = 16) -> TextTokenizer:
        """An existing ``tokenizer.json``: reuse its special tokens, add the missing ones."""
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise OmnimaskError(f"tokenizer file not found: {p}")
        try:
            tok = Tokenizer.from_file(str(p))
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exceptions
            raise OmnimaskError(f"{p} is not a Hugging Face tokenizer.json: {e}") from None
        roles, missing = _role_tokens(tok, num_sentinels)
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        return cls(tok, {r: tok.token_to_id(t) for r, t in roles.items()})

    @classmethod
    def load(cls, directory: str | os.PathLike) -> TextTokenizer:
        """A directory ``save`` wrote, or one ``transformers`` re-saved (``save_pretrained``
        of the tokenizer ``AutoTokenizer`` loads): its special tokens then give the roles."""
        d = Path(directory)
        meta = d / META
        if not meta.is_file():
            if (d / "tokenizer.json").is_file() and (d / "tokenizer_config.json").is_file():
                return cls._from_resaved(d)
            raise OmnimaskError(f"{d} is not an omnimask text tokenizer (no {META}); to use a "
                                f"plain tokenizer.json, train with from_file=PATH")
        info = json.loads(meta.read_text())
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        out = cls(tok, {k: int(v) for k, v in info["roles"].items()})
        if _fingerprint(tok) != info["fingerprint"]:
            raise OmnimaskError(f"{d}/tokenizer.json was changed after it was saved "
                                f"(fingerprint {_fingerprint(tok)} != {info['fingerprint']})")
        return out

    @classmethod
    def _from_resaved(cls, d: Path) -> TextTokenizer:
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        vocab = tok.get_vocab(with_added_tokens=True)
        k = 0  # CM3 sentinels <mask:0> ... <mask:k-1>
        while f"<mask:{k}>" in vocab:
            k += 1
        roles, missing = _role_tokens(tok, k)
        if missing:
            raise OmnimaskError(f"{d} is a Hugging Face tokenizer without omnimask's special "
                                f"tokens {sorted(missing)[:4]} (no {META}); build one with "
                                f"`omnimask tokenizer train text from_file={d}`")
        return cls(tok, {r: vocab[t] for r, t in roles.items()})

    def save(self, directory: str | os.PathLike) -> Path:
        """``tokenizer.json`` (with a post-processor, so ``AutoTokenizer(...)("text")`` adds
        ``<cls> ... <sep>`` as BERT's does; omnimask encodes without it), a
        ``tokenizer_config.json`` and ``special_tokens_map.json`` that transformers 4.40
        and 5 both load, and ``omnimask_text.json`` (roles, fingerprint)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        r, name = self.roles, self.tok.id_to_token
        tok = Tokenizer.from_str(self.tok.to_str())
        cls_, sep = name(r["cls"]), name(r["sep"])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls_} $A {sep}", pair=f"{cls_} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls_, r["cls"]), (sep, r["sep"])])
        (d / "tokenizer.json").write_text(_portable_json(tok), encoding="utf-8")
        named = {f"{k}_token": name(r[k]) for k in ("pad", "unk", "cls", "sep", "mask", "bos",
                                                    "eos")}
        extra = [name(i) for k, i in r.items() if f"{k}_token" not in named]
        tokens = {**named, "additional_special_tokens": extra}
        (d / "special_tokens_map.json").write_text(json.dumps(tokens, indent=2) + "\n")
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokens,
                  "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
                  "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000}
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (d / META).write_text(json.dumps({"roles": r, "fingerprint": _fingerprint(self.tok),
                                          "vocab_size": self.vocab_size}, indent=2) + "\n")
        return d

    # -- use ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def vocab(self, image_codes: int = 0, speech_units: int = 0) -> Vocab:
        return Vocab(self.vocab_size, image_codes, speech_units, dict(self.roles),
                     _fingerprint(self.tok))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def word_ids(self, words) -> list[int]:
        """The ids of the single-token forms of ``words``: as given, lowercase and
        capitalised, each with and without a leading space (a form of several tokens has
        none)."""
        return sorted({e[0] for w in words for f in {w, w.lower(), w.capitalize()}
                       for e in (self.encode(f), self.encode(" " + f)) if len(e) == 1})

    def is_special(self, i: int) -> bool:
        return i in self._special_ids
