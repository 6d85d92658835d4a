"""omnimask: multimodal masked foundation models (text, images, speech) on one packed trunk."""

__version__ = "0.1.0"
