"""ShapesWorld: a procedural dataset with exact ground truth for every omnimask task.

``scene`` samples and renders objects, ``language`` writes captions, questions and
referring expressions from the scene, ``speech`` speaks a caption, ``generate`` assembles
samples and writes shards. Deterministic for a seed: sample ``i`` of split ``s`` depends
only on ``(seed, s, i)``.
"""

from .generate import GENERATOR_VERSION, generate_shards, make_sample
from .vocab import COLORS, NOVEL_COMBOS, SHAPES, SIZES, SPLITS

__all__ = ["COLORS", "GENERATOR_VERSION", "NOVEL_COMBOS", "SHAPES", "SIZES", "SPLITS",
           "generate_shards", "make_sample"]
