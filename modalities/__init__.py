"""Per-modality processors, tokenizers and embedders (text, image, speech).

Importing this package registers the modality processors in ``omnimask.registry.PROCESSORS``.
"""

from . import image, speech, text  # noqa: F401  (registration side effects)
