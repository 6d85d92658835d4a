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

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

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
        vocab = tok.get_vocab(with_added_tokens=True)
        roles, missing = {}, []
        for role, token in special_tokens(num_sentinels).items():
            found = next((a for a in ALIASES.get(role, (token,)) if a in vocab), None)
            if found is None:
                missing.append(token)
            roles[role] = found or token
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        return cls(tok, {r: tok.token_to_id(t) for r, t in roles.items()})

    @classmethod
    def load(cls, directory: str | os.PathLike) -> TextTokenizer:
        d = Path(directory)
        meta = d / META
        if not meta.is_file():
            raise OmnimaskError(f"{d} is not an omnimask text tokenizer (no {META}); to use a "
                                f"plain tokenizer.json, train with from_file=PATH")
        info = json.loads(meta.read_text())
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        out = cls(tok, {k: int(v) for k, v in info["roles"].items()})
        if _fingerprint(tok) != info["fingerprint"]:
            raise OmnimaskError(f"{d}/tokenizer.json was changed after it was saved "
                                f"(fingerprint {_fingerprint(tok)} != {info['fingerprint']})")
        return out

    def save(self, directory: str | os.PathLike) -> Path:
        from transformers import PreTrainedTokenizerFast

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        r = self.roles
        name = self.tok.id_to_token
        extra = [name(i) for k, i in r.items() if k not in ("pad", "unk", "cls", "sep", "mask",
                                                             "bos", "eos")]
        fast = PreTrainedTokenizerFast(
            tokenizer_object=self.tok, pad_token=name(r["pad"]), unk_token=name(r["unk"]),
            cls_token=name(r["cls"]), sep_token=name(r["sep"]), mask_token=name(r["mask"]),
            bos_token=name(r["bos"]), eos_token=name(r["eos"]), additional_special_tokens=extra)
        fast.save_pretrained(str(d))
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

    def is_special(self, i: int) -> bool:
        return i in self._special_ids
