"""Speech modality: processors (fbank features and unit codebooks arrive with issue 3)."""

from . import processor  # noqa: F401
