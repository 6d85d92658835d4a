"""The closed world: shapes, colours, sizes, splits and the held-out colour-shape pairs."""

from __future__ import annotations

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles",
          "star": "stars", "hexagon": "hexagons", "cross": "crosses"}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 220, 35),
    "green": (35, 160, 55),
    "cyan": (40, 205, 215),
    "blue": (35, 65, 215),
    "purple": (135, 50, 190),
    "pink": (250, 130, 195),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SIZES: dict[str, tuple[float, float]] = {  # radius as a fraction of the image side
    "small": (0.095, 0.12),
    "large": (0.16, 0.20),
}
SPLITS: tuple[str, ...] = ("train", "val", "test", "test-novel")
# Colour-shape pairs never shown in train/val/test; each test-novel image has at least one.
# Every shape and every colour but two appears in exactly one held-out pair.
NOVEL_COMBOS: frozenset[tuple[str, str]] = frozenset(
    (shape, COLOR_NAMES[(3 * i + 1) % len(COLOR_NAMES)]) for i, shape in enumerate(SHAPES)
)
# Semantic classes in seg.png: 0 background, 1.. the shapes in SHAPES order.
SEG_CLASSES: tuple[str, ...] = ("background", *SHAPES)
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
ANSWERS: tuple[str, ...] = (*COLOR_NAMES, *SHAPES, *SIZES, "0", "1", "2", "3", "4", "yes", "no")
QA_TYPES: tuple[str, ...] = ("color", "shape", "size", "count", "exists", "relation")
