"""The shared transformer trunk over packed multimodal sequences (arrives with issue 4)."""
