"""One id space for every modality: text ids (specials included), image codes, speech units.

Layout: ``[0, text)`` are the text tokenizer's own ids (the special tokens live there, at
the ids the tokenizer gives them), then ``[image_offset, image_offset + image_codes)``
the VQ codes, then the speech units. The vocabulary is saved with every model
(``omnimask_vocab.json``: not a BPE ``vocab.json`` as Hugging Face reads that name; older
directories have it as ``vocab.json``, still read) together with a fingerprint of the
text tokenizer, so a tokenizer that does not match the model's ids fails loudly instead of
silently shifting them.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from omnimask.errors import OmnimaskError
from omnimask.safeio import atomic_write_bytes

MODALITIES = ("text", "image", "speech")
FILE, LEGACY_FILE = "omnimask_vocab.json", "vocab.json"  # in model and tokenizer directories


def vocab_file(directory: str | os.PathLike) -> Path:
    """A directory's vocabulary file: ``omnimask_vocab.json``, else an older ``vocab.json``."""
    d = Path(directory)
    return d / LEGACY_FILE if not (d / FILE).is_file() and (d / LEGACY_FILE).is_file() else d / FILE


class VocabMismatch(OmnimaskError):
    """A tokenizer or checkpoint does not agree with the vocabulary it is used with."""


@dataclass(frozen=True)
class Vocab:
    text_size: int
    image_codes: int = 0
    speech_units: int = 0
    specials: dict[str, int] = field(default_factory=dict)  # role ("pad", "mask:3") -> id
    text_fingerprint: str = ""  # sha256 of the text tokenizer's token -> id table

    def __post_init__(self) -> None:
        for n, v in (("text_size", self.text_size), ("image_codes", self.image_codes),
                     ("speech_units", self.speech_units)):
            if v < 0:
                raise ValueError(f"{n} must be >= 0, got {v}")
        bad = {r: i for r, i in self.specials.items() if not 0 <= i < self.text_size}
        if bad:
            raise ValueError(f"special token ids outside the text range: {bad}")

    # -- ranges ------------------------------------------------------------------------------
    @property
    def image_offset(self) -> int:
        return self.text_size

    @property
    def speech_offset(self) -> int:
        return self.text_size + self.image_codes

    @property
    def size(self) -> int:
        return self.text_size + self.image_codes + self.speech_units

    def ranges(self) -> dict[str, tuple[int, int]]:
        return {"text": (0, self.text_size),
                "image": (self.image_offset, self.speech_offset),
                "speech": (self.speech_offset, self.size)}

    def special(self, role: str) -> int:
        try:
            return self.specials[role]
        except KeyError:
            raise VocabMismatch(f"the vocabulary has no special token {role!r}") from None

    # -- conversions -------------------------------------------------------------------------
    @staticmethod
    def _check(x: torch.Tensor, n: int, what: str) -> None:
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= n):
            raise ValueError(f"{what} out of range [0, {n}): min {int(x.min())}, max {int(x.max())}")

    def from_image(self, codes: torch.Tensor) -> torch.Tensor:
        self._check(codes, self.image_codes, "image codes")
        return codes + self.image_offset

    def to_image(self, ids: torch.Tensor) -> torch.Tensor:
        self._check(ids - self.image_offset, self.image_codes, "ids (as image codes)")
        return ids - self.image_offset

    def from_speech(self, units: torch.Tensor) -> torch.Tensor:
        self._check(units, self.speech_units, "speech units")
        return units + self.speech_offset

    def to_speech(self, ids: torch.Tensor) -> torch.Tensor:
        self._check(ids - self.speech_offset, self.speech_units, "ids (as speech units)")
        return ids - self.speech_offset

    def from_text(self, ids: torch.Tensor) -> torch.Tensor:
        self._check(ids, self.text_size, "text ids")
        return ids

    def modality_of(self, ids: torch.Tensor) -> torch.Tensor:
        """0 text, 1 image, 2 speech (indices into ``MODALITIES``)."""
        self._check(ids, self.size, "ids")
        return (ids >= self.image_offset).long() + (ids >= self.speech_offset).long()

    # -- persistence -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Vocab:
        return cls(**d)

    def save(self, path: str | os.PathLike) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_bytes(p, (json.dumps(self.to_dict(), indent=2, sort_keys=True)
                                      + "\n").encode())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocab:
        p = Path(path)
        if not p.is_file():
            raise OmnimaskError(f"vocabulary file not found: {p}")
        return cls.from_dict(json.loads(p.read_text()))

    def check_compatible(self, other: Vocab, what: str = "tokenizer") -> None:
        """Raise :class:`VocabMismatch` naming every field where ``other`` differs."""
        diffs = [f"{k}: model {v!r} vs {what} {getattr(other, k)!r}"
                 for k, v in self.to_dict().items() if getattr(other, k) != v]
        if diffs:
            raise VocabMismatch(f"the {what}'s vocabulary does not match the model's: "
                                + "; ".join(d if len(d) < 200 else d[:200] + "..." for d in diffs))
