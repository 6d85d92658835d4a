"""A shape judge for ShapesWorld pictures: do they show the shapes their captions name?

GenEval (Ghosh et al. 2023) and DALL-Eval score text-to-image models with a detector run
on the generated pictures instead of by eye; this is the closed-world version, in two
steps. (1) Objects: a pixel belongs to colour ``c`` when it is saturated (max - min
channel above ``CHROMA``; the generator's backgrounds are muted and every palette colour
is far above it) and ``c`` is its nearest palette colour; each 8-connected component of
a colour's pixels with at least ``MIN_PIXELS`` is one object. (2) Shapes: a small CNN
classifies an object's mask, cropped to a square around it and resized to 24 x 24. It is
trained on the components that step (1) finds in scenes rendered on the fly (train
split), blurred and noised so that soft, decoded pictures are judged by their outlines;
each component's label is the shape of the object it overlaps most.

A picture is scored against the (colour, shape) pairs its caption names: a named colour
is present when it has an object; ``shape_hit`` is the share of the objects of named
colours whose judged shape is one the caption names with that colour; its chance is that
many of the six shapes. The same score on the real pictures and on their VQ
reconstructions shows how much of a shortfall is the judge's, the tokenizer's or the
generator's.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from omnimask.errors import Interrupted, OmnimaskError

from .language import named_count, named_objects
from .scene import sample_scene
from .vocab import COLOR_NAMES, COLORS, SHAPES

CHROMA = 80  # max - min channel: backgrounds stay below ~60, palette colours >= 120
MIN_PIXELS = 8  # the generator's own minimum visible object size
CROP = 24
# `load_or_train(SHIPPED)`: the judge `train_judge()` makes with its defaults, shipped in the
# package as SHIPPED_FILE (it depends only on the generator, not on anyone's data);
# regenerate it with `python -m omnimask.train.data.shapesworld.judge` after a change of
# the renderer
SHIPPED, SHIPPED_FILE = "shipped", "shape_judge.safetensors"
_PALETTE = torch.tensor([COLORS[c] for c in COLOR_NAMES], dtype=torch.float32)


def colour_map(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> [B, H, W] long: the nearest palette colour's index at
    saturated pixels, -1 elsewhere."""
    x = images.float()
    chroma = x.amax(1) - x.amin(1)
    rgb = x.permute(0, 2, 3, 1).reshape(-1, 3)
    nearest = torch.cdist(rgb, _PALETTE).argmin(1).view(chroma.shape)
    return nearest.masked_fill(chroma < CHROMA, -1)


def components(mask: torch.Tensor) -> torch.Tensor:
    """8-connected components of a bool [B, H, W] mask: [B, H, W] long labels (0: outside),
    each component labelled by its largest raster index within its picture, plus one (so
    the labels, and the order objects are listed in, do not depend on the batch)."""
    from scipy import ndimage

    b, h, w = mask.shape
    within = np.zeros((3, 3, 3), dtype=bool)
    within[1] = True  # 8-connected in a picture, never across pictures
    lab, n = ndimage.label(mask.cpu().numpy(), structure=within)
    if not n:
        return torch.zeros(b, h, w, dtype=torch.long)
    raster = np.broadcast_to(np.arange(1, h * w + 1).reshape(1, h, w), lab.shape)
    top = ndimage.maximum(raster, lab, index=np.arange(1, n + 1)).astype(np.int64)
    return torch.from_numpy(np.concatenate([[0], top])[lab])


def objects(images: torch.Tensor) -> list[list[tuple[int, torch.Tensor]]]:
    """Per picture, its objects: (palette index, bool [H, W] mask) for every component of
    at least ``MIN_PIXELS`` pixels of one colour."""
    cmap = colour_map(images)
    out: list[list[tuple[int, torch.Tensor]]] = [[] for _ in range(len(images))]
    for c in cmap.unique().tolist():
        if c < 0:
            continue
        lab = components(cmap == c)
        for b in range(len(images)):
            ids, counts = lab[b].unique(return_counts=True)
            for i, n in zip(ids.tolist(), counts.tolist()):
                if i and n >= MIN_PIXELS:
                    out[b].append((c, lab[b] == i))
    return out


def crop(mask: torch.Tensor, size: int = CROP) -> torch.Tensor:
    """A bool [H, W] mask cropped to the square around its pixels (a 2-pixel margin),
    resized to float [size, size]."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    cy, cx = (ys.min() + ys.max()).item() / 2, (xs.min() + xs.max()).item() / 2
    half = max(ys.max() - ys.min(), xs.max() - xs.min()).item() / 2 + 2
    y0, x0 = int(math.floor(cy - half)), int(math.floor(cx - half))
    side = int(math.ceil(2 * half)) + 1
    pad = F.pad(mask.float(), (side, side, side, side))
    box = pad[y0 + side:y0 + 2 * side, x0 + side:x0 + 2 * side]
    return F.interpolate(box[None, None], size=(size, size), mode="area")[0, 0]


class ShapeClassifier(nn.Module):
    """Masks [B, 24, 24] -> logits [B, len(SHAPES)]."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4 * w, len(SHAPES)))

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        return self.net(masks[:, None] * 2 - 1)


def degrade(images: torch.Tensor, gen: torch.Generator, max_sigma: float = 1.5) -> torch.Tensor:
    """Random Gaussian blur (sigma 0..max_sigma per picture) and pixel noise, uint8 in/out."""
    x = images.float()
    b, c, h, w = x.shape
    sigma = (torch.rand(b, generator=gen) * max_sigma).clamp_min(1e-3)
    k = torch.arange(-3, 4, dtype=torch.float32)
    g = torch.exp(-k[None] ** 2 / (2 * sigma[:, None] ** 2))
    g = (g / g.sum(1, keepdim=True)).repeat_interleave(c, 0)[:, None, :, None]  # [B*C,1,7,1]
    y = F.pad(x.reshape(1, b * c, h, w), (3, 3, 3, 3), mode="replicate")
    y = F.conv2d(F.conv2d(y, g, groups=b * c), g.transpose(2, 3), groups=b * c)
    noise = torch.randn(x.shape, generator=gen) * torch.rand(b, 1, 1, 1, generator=gen) * 8
    return (y.reshape(b, c, h, w) + noise).round().clamp(0, 255).to(torch.uint8)


def rendered_batch(rng: np.random.Generator, n: int, size: int = 64
                   ) -> tuple[torch.Tensor, torch.Tensor, list]:
    """``n`` fresh train-split scenes: uint8 pictures [n, 3, S, S], instance maps [n, S, S]
    and their objects."""
    scenes = [sample_scene(rng, "train", size) for _ in range(n)]
    images = torch.from_numpy(np.stack([s[1] for s in scenes])).permute(0, 3, 1, 2)
    inst = torch.from_numpy(np.stack([s[3] for s in scenes])).long()
    return images.contiguous(), inst, [s[0] for s in scenes]


def labelled_crops(images: torch.Tensor, inst: torch.Tensor, objs: list
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The objects step (1) finds, as crops [N, 24, 24], each labelled with the shape of
    the rendered object it overlaps most: [N] long."""
    crops, labels = [], []
    for b, found in enumerate(objects(images)):
        for _, m in found:
            ids, counts = inst[b][m].unique(return_counts=True)
            keep = ids > 0
            if not bool(keep.any()):
                continue
            oid = int(ids[keep][counts[keep].argmax()])
            crops.append(crop(m))
            labels.append(SHAPES.index(objs[b][oid - 1].shape))
    return torch.stack(crops), torch.tensor(labels)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flips and quarter turns: none changes a shape's class."""
    if float(torch.rand(1, generator=gen)) < 0.5:
        x = x.flip(-1)
    return torch.rot90(x, int(torch.randint(4, (1,), generator=gen)), (-2, -1))


def train_judge(scenes: int = 2000, epochs: int = 8, batch_size: int = 128, lr: float = 3e-3,
                seed: int = 0, progress: bool = True) -> ShapeClassifier:
    """A classifier trained on the objects of ``scenes`` rendered, degraded scenes, through
    the one training loop: AdamW, warmup then cosine, in a temporary run directory (the
    judge is the only output; an interrupted training starts again)."""
    from omnimask.train.trainer import Trainer, TrainerConfig, step_seed

    torch.manual_seed(seed)
    rng, gen = np.random.default_rng([seed, 7]), torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for start in tqdm(range(0, scenes, 250), desc="shape judge: scenes", disable=not progress):
        images, inst, objs = rendered_batch(rng, min(250, scenes - start))
        x, y = labelled_crops(degrade(images, gen), inst, objs)
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys)
    model = ShapeClassifier()
    per_epoch = math.ceil(len(x) / batch_size)

    def make_batch(step: int, micro: int) -> tuple[str, dict]:
        """Epochs of shuffled crops, a pure function of the step: the epoch's order from
        (seed, epoch), the augmentation from (seed, step)."""
        epoch, i = divmod(step, per_epoch)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(
            step_seed(seed, epoch, 1)))
        idx = order[i * batch_size:(i + 1) * batch_size]
        aug = torch.Generator().manual_seed(step_seed(seed, step, 2))
        return "shapes", {"x": _augment(x[idx], aug), "y": y[idx]}

    def loss_fn(name: str, batch: dict) -> dict:
        logits = model(batch["x"])
        return {"loss": F.cross_entropy(logits, batch["y"]), "crops": len(batch["y"]),
                "accuracy": (logits.argmax(1) == batch["y"]).float().mean()}

    steps = epochs * per_epoch
    cfg = TrainerConfig(max_steps=steps, lr=lr, warmup_steps=max(1, steps // 10),
                        weight_decay=1e-4, betas=[0.9, 0.999], clip=0.0, precision="fp32",
                        device="cpu", checkpoint_every=steps, eval_every=0,
                        log_every=per_epoch, seed=seed, tensorboard=False)
    with tempfile.TemporaryDirectory(prefix="omnimask-shape-judge-") as run:
        summary = Trainer(cfg, run, model, make_batch, loss_fn, progress=progress,
                          desc="shape judge: train", units="crops", local=True).fit()
    if summary["status"].startswith("interrupted"):
        raise Interrupted(f"shape judge training {summary['status']} at step "
                          f"{summary['step']}; run it again to train the judge")
    return model.eval()


def load_or_train(path: str | Path, progress: bool = True, **kw) -> ShapeClassifier:
    """The judge saved at ``path`` (safetensors; ``SHIPPED``: the package's own), or a new
    one trained and saved there (written to a temporary file and renamed: a half-written
    judge is never loaded)."""
    from safetensors.torch import load, save_file

    shipped = str(path) == SHIPPED
    p = shipped_judge() if shipped else Path(path)
    if p.is_file():
        model = ShapeClassifier()
        try:
            model.load_state_dict(load(p.read_bytes()))
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
            fix = "reinstall omnimask" if shipped else "delete it to train a new one"
            raise OmnimaskError(f"shape judge {p} is unreadable ({type(e).__name__}: {e}); "
                                f"{fix}") from None
        return model.eval()
    if shipped:
        raise OmnimaskError(f"the package has no {SHIPPED_FILE}: reinstall omnimask")
    model = train_judge(progress=progress, **kw)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    save_file(model.state_dict(), tmp)
    tmp.replace(p)
    return model


def shipped_judge():
    """The package's judge file (an ``importlib.resources`` Traversable)."""
    from importlib.resources import files

    return files(__package__) / SHIPPED_FILE


@torch.no_grad()
def judge_images(judge: ShapeClassifier, images: torch.Tensor, captions: list[str]
                 ) -> list[list[dict]]:
    """Per picture, per colour its caption names with a shape: ``{"colour", "named",
    "objects", "shapes"}``: the named shapes, how many objects of that colour the picture
    has, and the judged shape of each."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    found = objects(images)
    out = []
    for b, cap in enumerate(captions):
        by_colour: dict[str, set[str]] = {}
        for colour, shape in named_objects(cap):
            by_colour.setdefault(colour, set()).add(shape)
        rows = []
        for colour, shapes in sorted(by_colour.items()):
            masks = [m for c, m in found[b] if COLOR_NAMES[c] == colour]
            judged = ([SHAPES[i] for i in judge(torch.stack([crop(m) for m in masks]))
                       .argmax(1).tolist()] if masks else [])
            rows.append({"colour": colour, "named": sorted(shapes), "objects": len(masks),
                         "shapes": judged})
        out.append(rows)
    return out


def shape_scores(judged: list[list[dict]]) -> dict[str, float]:
    """``colour_present``: share of named colours with an object; ``shape_hit``: share of
    those objects whose judged shape is named with their colour; ``shape_chance``: the
    same for shapes drawn at random."""
    rows = [r for img in judged for r in img]
    objs = [(r, s) for r in rows for s in r["shapes"]]
    n = max(len(objs), 1)
    return {"named": len(rows),
            "colour_present": round(sum(r["objects"] > 0 for r in rows) / max(len(rows), 1), 3),
            "objects": len(objs),
            "shape_hit": round(sum(s in r["named"] for r, s in objs) / n, 3),
            "shape_chance": round(sum(len(r["named"]) for r, _ in objs) / (len(SHAPES) * n), 3)}


def count_scores(images: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """``count_hit``: share of pictures with as many objects (saturated components,
    ``objects``) as their caption introduces (``named_count``); captions that introduce
    none are skipped. Touching objects of one colour make one component, so rendered
    scenes score below 1: compare with the originals' score."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    found = objects(images)
    pairs = [(len(f), k) for f, k in zip(found, map(named_count, captions)) if k]
    return {"counted": len(pairs),
            "count_hit": round(sum(a == b for a, b in pairs) / max(len(pairs), 1), 3)}


if __name__ == "__main__":  # regenerates the shipped judge (~30 s) in the source tree
    from importlib.resources import as_file

    with as_file(shipped_judge()) as target:
        Path(target).unlink(missing_ok=True)
        load_or_train(target)
