"""Assemble the shared vocabulary from trained tokenizers, and check it against a model's."""

from __future__ import annotations

import os

from .vocab import Vocab


def build_vocab(text_dir: str | os.PathLike, image_dir: str | os.PathLike | None = None,
                speech_dir: str | os.PathLike | None = None) -> Vocab:
    """Text ids, then the image codes, then the speech units of the given tokenizers."""
    from .image.tokenizer import ImageTokenizer
    from .speech.tokenizer import SpeechTokenizer
    from .text.tokenizer import TextTokenizer

    image = ImageTokenizer.load(image_dir).size if image_dir else 0
    speech = SpeechTokenizer.load(speech_dir).size if speech_dir else 0
    return TextTokenizer.load(text_dir).vocab(image_codes=image, speech_units=speech)


def check_tokenizers(model_vocab: Vocab, text_dir, image_dir=None, speech_dir=None) -> Vocab:
    """Raise ``VocabMismatch`` unless these tokenizers give exactly the model's id space."""
    v = build_vocab(text_dir, image_dir, speech_dir)
    model_vocab.check_compatible(v)
    return v
