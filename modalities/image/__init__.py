"""Image modality: processors (VQ tokenizer and patch encoder arrive with issue 3)."""

from . import processor  # noqa: F401
