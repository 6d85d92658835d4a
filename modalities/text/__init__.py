"""Text modality: processors (the BPE tokenizer arrives with issue 3)."""

from . import processor  # noqa: F401
