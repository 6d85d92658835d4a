"""Task heads: VQA, retrieval, captioning, segmentation (arrive with their issues)."""
