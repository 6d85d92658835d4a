"""Sample a scene of 1-4 objects and render image, semantic and instance masks.

Objects are drawn at 4x resolution and box-filtered down, so edges are anti-aliased while
the masks (nearest sample of the same 4x drawing) stay exact. Later objects occlude earlier
ones; a scene is kept only if every object stays at least 55% visible.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

from .vocab import COLOR_NAMES, COLORS, NOVEL_COMBOS, SHAPES, SIZES

SUPERSAMPLE = 4
MIN_VISIBLE_FRACTION = 0.55
MIN_VISIBLE_PIXELS = 8


@dataclass
class SceneObject:
    id: int  # instance id in inst.png (1-based)
    shape: str
    color: str
    size: str
    center: tuple[float, float]  # (x, y) in pixels of the output image
    radius: float  # pixels
    rotation: float  # degrees
    rgb: tuple[int, int, int]
    novel: bool
    area: int = 0  # visible pixels in inst.png
    bbox: tuple[int, int, int, int] = (0, 0, 0, 0)  # visible x0, y0, x1, y1 (exclusive)

    def to_json(self) -> dict:
        d = asdict(self)
        d["center"] = [round(c, 3) for c in self.center]
        d["radius"] = round(self.radius, 3)
        d["rotation"] = round(self.rotation, 3)
        d["rgb"] = list(self.rgb)
        d["bbox"] = list(self.bbox)
        return d


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(r, math.radians(45 + 90 * k)) for k in range(4)]
    elif shape == "triangle":
        pts = [(1.15 * r, math.radians(-90 + 120 * k)) for k in range(3)]
    elif shape == "hexagon":
        pts = [(r, math.radians(60 * k)) for k in range(6)]
    elif shape == "star":
        pts = [((1.15 if k % 2 == 0 else 0.5) * r, math.radians(-90 + 36 * k)) for k in range(10)]
    elif shape == "cross":
        w = 0.36
        unit = [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1),
                (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)]
        pts = [(r * math.hypot(x, y), math.atan2(y, x)) for x, y in unit]
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    a = math.radians(rot)
    return [(cx + d * math.cos(t + a), cy + d * math.sin(t + a)) for d, t in pts]


def _draw(draw: ImageDraw.ImageDraw, obj: SceneObject, fill, scale: int) -> None:
    cx, cy, r = obj.center[0] * scale, obj.center[1] * scale, obj.radius * scale
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(obj.shape, cx, cy, r, obj.rotation), fill=fill)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted gradient plus a random texture; saturated object colours stay distinct from it."""
    g = rng.uniform(70, 185)
    c1 = g + rng.uniform(-22, 22, 3)
    c2 = g + rng.uniform(-35, 35) + rng.uniform(-22, 22, 3)
    ang = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    t = (xx * math.cos(ang) + yy * math.sin(ang))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    bg = c1[None, None, :] * (1 - t[..., None]) + c2[None, None, :] * t[..., None]
    kind = rng.integers(3)
    if kind == 0:  # smooth low-frequency blotches
        grid = rng.normal(0, 14, (4, 4)).astype(np.float32)
        tex = np.asarray(Image.fromarray(grid, mode="F").resize((size, size), Image.BICUBIC))
    elif kind == 1:  # faint stripes
        f = rng.uniform(3, 9)
        a2 = rng.uniform(0, math.pi)
        tex = 9 * np.sin(2 * math.pi * f * (xx * math.cos(a2) + yy * math.sin(a2)))
    else:  # speckle
        grid = rng.normal(0, 11, (16, 16)).astype(np.float32)
        tex = np.asarray(Image.fromarray(grid, mode="F").resize((size, size), Image.BILINEAR))
    return bg + tex[..., None]


def _sample_objects(rng: np.random.Generator, split: str, size: int) -> list[SceneObject]:
    n = int(rng.integers(1, 5))
    objs = []
    for k in range(n):
        if split == "test-novel" and k == 0:
            shape, color = sorted(NOVEL_COMBOS)[int(rng.integers(len(NOVEL_COMBOS)))]
        else:
            while True:
                shape = SHAPES[int(rng.integers(len(SHAPES)))]
                color = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
                if (shape, color) not in NOVEL_COMBOS:
                    break
        size_name = ("small", "large")[int(rng.integers(2))]
        lo, hi = SIZES[size_name]
        r = rng.uniform(lo, hi) * size
        margin = 1.2 * r + 1
        cx, cy = rng.uniform(margin, size - margin, 2)
        rgb = tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in COLORS[color])
        objs.append(SceneObject(
            id=k + 1, shape=shape, color=color, size=size_name, center=(float(cx), float(cy)),
            radius=float(r), rotation=float(rng.uniform(0, 360)), rgb=rgb,  # type: ignore[arg-type]
            novel=(shape, color) in NOVEL_COMBOS))
    if split == "test-novel":  # the novel object need not be drawn first
        order = rng.permutation(n)
        objs = [objs[i] for i in order]
        for k, o in enumerate(objs):
            o.id = k + 1
    return objs


def _instance_map(objs: list[SceneObject], size: int) -> np.ndarray:
    s = size * SUPERSAMPLE
    inst = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(inst)
    for o in objs:
        _draw(d, o, o.id, SUPERSAMPLE)
    return np.asarray(inst.resize((size, size), Image.NEAREST))


def _full_area(o: SceneObject, size: int) -> int:
    return int((_instance_map([o], size) == o.id).sum())


def sample_scene(rng: np.random.Generator, split: str, size: int, max_tries: int = 200
                 ) -> tuple[list[SceneObject], np.ndarray, np.ndarray, np.ndarray]:
    """Return (objects, image HxWx3 uint8, seg HxW uint8, inst HxW uint8)."""
    for _ in range(max_tries):
        objs = _sample_objects(rng, split, size)
        inst = _instance_map(objs, size)
        ok = True
        for o in objs:
            vis = inst == o.id
            area = int(vis.sum())
            if area < MIN_VISIBLE_PIXELS or area < MIN_VISIBLE_FRACTION * _full_area(o, size):
                ok = False
                break
            ys, xs = np.nonzero(vis)
            o.area = area
            o.bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        if ok:
            break
    else:  # pragma: no cover - 200 failures in a row do not happen with these sizes
        raise RuntimeError("could not place objects without heavy occlusion")
    image = _render(rng, objs, size)
    lut = np.zeros(256, np.uint8)
    for o in objs:
        lut[o.id] = SHAPES.index(o.shape) + 1
    return objs, image, lut[inst], inst.astype(np.uint8)


def _render(rng: np.random.Generator, objs: list[SceneObject], size: int) -> np.ndarray:
    bg = np.clip(_background(rng, size), 0, 255).astype(np.uint8)
    canvas = Image.fromarray(bg).resize((size * SUPERSAMPLE,) * 2, Image.NEAREST)
    d = ImageDraw.Draw(canvas)
    for o in objs:
        _draw(d, o, o.rgb, SUPERSAMPLE)
    img = np.asarray(canvas.resize((size, size), Image.BOX)).astype(np.float32)
    img += rng.normal(0, 4.0, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
